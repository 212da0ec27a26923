"""The agent's error tree.

    AgentError
    ├── CoordinatorUnavailable   network or coordinator down, or over our rate limit; retry with backoff (retryable)
    ├── CredentialRejected       our identity is unknown to the coordinator; enrol again
    ├── RequestRefused           refused for a reason retrying won't fix (invalid, not permitted, revoked)
    └── ConfigError              (edge_agent.config) the config file is wrong
"""

from __future__ import annotations


class AgentError(Exception):
    retryable = False


class CoordinatorUnavailable(AgentError):
    retryable = True

    def __init__(self, message: str, retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        """The coordinator's hint (when over the rate limit): wait at least this long before retrying."""


class CredentialRejected(AgentError):
    pass


class RequestRefused(AgentError):
    pass
