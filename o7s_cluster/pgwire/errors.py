"""SQLSTATE codes O7s itself sends, and the protocol error the framing raises."""

from __future__ import annotations

PROTOCOL_VIOLATION = "08P01"
CONNECTION_FAILURE = "08006"          # backend unreachable or lost
CANNOT_CONNECT_NOW = "57P03"          # backend refused / pool could not connect
INVALID_PASSWORD = "28P01"            # wrong password or unknown org (deliberately the same)
INVALID_AUTHORIZATION = "28000"       # e.g. client refused SCRAM
INVALID_CATALOG_NAME = "3D000"        # database not registered for this org
TOO_MANY_CONNECTIONS = "53300"
LOGIN_BLOCKED = "08004"               # the login breaker: server rejected the connection (see the README)
CONFIGURATION_LIMIT_EXCEEDED = "53400"  # query rate: refused after the longest wait (limits.py)
PROGRAM_LIMIT_EXCEEDED = "54000"      # too many named prepared statements on one connection
DUPLICATE_PREPARED_STATEMENT = "42P05"  # a Parse of a statement name the client already uses
POOL_TIMEOUT = "53P01"                # O7s-specific class 53 code: no backend connection free in time
ADMIN_SHUTDOWN = "57P01"
QUERY_CANCELED = "57014"
FEATURE_NOT_SUPPORTED = "0A000"
INTERNAL_ERROR = "XX000"
OUT_OF_MEMORY = "53200"               # the worker's budget for client input is exhausted
CONTROL_PLANE_UNAVAILABLE = "08001"   # the control plane could not be reached to authenticate


def encode_error(severity: str, code: str, message: str, *, hint: str | None = None,
                 detail: str | None = None, notice: bool = False) -> bytes:
    """An ErrorResponse (or NoticeResponse) with the fields PostgreSQL always sends."""
    sev = severity.encode()
    fields = [b"S" + sev, b"V" + sev, b"C" + code.encode(), b"M" + _text(message)]
    if detail:
        fields.append(b"D" + _text(detail))
    if hint:
        fields.append(b"H" + _text(hint))
    body = b"\x00".join(fields) + b"\x00\x00"
    return (b"N" if notice else b"E") + (len(body) + 4).to_bytes(4, "big") + body


def _text(value: str) -> bytes:
    return value.replace("\x00", "").encode()


class ClientError(Exception):
    """Every error O7s itself reports to a client: FATAL (then the connection closes) unless `fatal` is False."""

    def __init__(self, code: str, message: str, *, hint: str | None = None, detail: str | None = None,
                 fatal: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint
        self.detail = detail
        self.fatal = fatal

    def to_bytes(self) -> bytes:
        return encode_error("FATAL" if self.fatal else "ERROR", self.code, self.message, hint=self.hint,
                            detail=self.detail)


class ProtocolViolation(Exception):
    """Bytes from a peer that break the protocol: the connection cannot go on."""

    code = PROTOCOL_VIOLATION
