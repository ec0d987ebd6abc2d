"""The exception tree. Each class says what the caller must do, not what went wrong inside a library.

    EdgeAgentError
    ├── ConfigError        the configuration cannot be used; exit 78 (EX_CONFIG). Carries every
    │                      problem found, each one line "file: key.path: problem".
    ├── DecodeError        a payload cannot be read as a plate read; kept as a `rejected` row with
    │                      its reason and the field that is wrong.
    ├── JournalError       the journal cannot be written or read (disk full, read-only, I/O error);
    │                      stop acknowledging, report `down`, retry later.
    ├── KeyFileError       a key or certificate file is missing, unreadable or of the wrong kind.
    └── DeliveryError      one delivery attempt failed; the subclass decides the entry's fate:
        ├── Retryable          network error, timeout, 202, 429, 5xx: try again later (backoff,
        │                      `retry_after` when the server gave one).
        ├── ResponseUnverified a 2xx whose signature or timestamp does not verify: retry, same number.
        ├── Permanent          400 PARAM_ERROR / INVALID_REQUEST: dead-letter with the API's words.
        └── Blocked            401, 403, 404: keep entries pending, pause delivery, show in status.

Library exceptions are translated inside their adapter with `raise ... from exc`.
"""

from __future__ import annotations

from edgeagent.model import Reason


class EdgeAgentError(Exception):
    """Base of every error edgeagent raises on purpose."""


class ConfigError(EdgeAgentError):
    """The configuration is unusable. `problems` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class DecodeError(EdgeAgentError):
    """A payload is not a readable plate read. `field` names the offending field, when there is one."""

    def __init__(self, reason: Reason, detail: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {detail}" if field else detail)
        self.reason = reason
        self.detail = detail
        self.field = field


class JournalError(EdgeAgentError):
    """The journal cannot be written or read right now."""


class KeyFileError(EdgeAgentError):
    """A key or certificate file is missing, unreadable, or not the expected kind of key."""


class DeliveryError(EdgeAgentError):
    """One delivery attempt failed. `code`/`message`/`detail` are the API's words when it gave any."""

    def __init__(
        self,
        summary: str,
        *,
        status: int | None = None,
        code: str = "",
        message: str = "",
        detail: str = "",
        request_id: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(summary)
        self.summary = summary
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.request_id = request_id
        self.retry_after = retry_after


class Retryable(DeliveryError):
    """Try the same entry again later, with backoff."""


class ResponseUnverified(Retryable):
    """A 2xx that did not verify: nothing counts as sent; retry with the same out_serial_number."""


class Permanent(DeliveryError):
    """The API refused this entry for good: dead-letter it with the API's reason."""


class Blocked(DeliveryError):
    """Delivery as a whole is blocked (auth, permission, wrong endpoint): pause, keep entries pending."""
