"""What the limits refuse with: the session turns a LimitError into an ErrorResponse."""

from __future__ import annotations

SQLSTATE_TOO_MANY_CONNECTIONS = "53300"
SQLSTATE_RATE_LIMIT = "53400"


class LimitError(Exception):
    """What the session sends to the client: ErrorResponse(severity, code, message, hint)."""

    def __init__(self, code: str, severity: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.severity = severity
        self.message = message
        self.hint = hint
