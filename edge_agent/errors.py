"""The agent's error tree.

    AgentError
    ├── CoordinatorUnavailable   network or coordinator down; retry with backoff (retryable)
    ├── CredentialRejected       our identity is unknown or revoked; enrol again
    ├── RequestRefused           the coordinator refused the request for a reason that retrying won't fix
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
