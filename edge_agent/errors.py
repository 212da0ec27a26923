"""The agent's error tree.

    AgentError
    ├── CoordinatorUnavailable   network or coordinator down; retry with backoff (retryable)
    ├── CredentialRejected       our identity is unknown to the coordinator; enrol again
    ├── RequestRefused           refused for a reason retrying won't fix (invalid, not permitted, revoked)
    └── ConfigError              (edge_agent.config) the config file is wrong
"""

from __future__ import annotations


class AgentError(Exception):
    retryable = False


class CoordinatorUnavailable(AgentError):
    retryable = True


class CredentialRejected(AgentError):
    pass


class RequestRefused(AgentError):
    pass
