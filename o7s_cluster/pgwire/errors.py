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
POOL_TIMEOUT = "53P01"                # O7s-specific class 53 code: no backend connection free in time
ADMIN_SHUTDOWN = "57P01"
QUERY_CANCELED = "57014"
FEATURE_NOT_SUPPORTED = "0A000"
INTERNAL_ERROR = "XX000"
CONTROL_PLANE_UNAVAILABLE = "08001"   # the control plane could not be reached to authenticate


class ProtocolViolation(Exception):
    """Bytes from a peer that break the protocol: the connection cannot go on."""

    code = PROTOCOL_VIOLATION
