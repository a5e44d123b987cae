"""One client session: start-up, SCRAM, and the relay between the client and pooled backends.

Two tasks per attached backend: the client loop reads client messages and forwards them (attaching a
backend when one is needed), the relay task forwards backend messages to the client and, in
transaction mode, gives the backend back at ReadyForQuery 'I' with nothing pending. A queue of
expected responses (one entry per forwarded message that the backend answers) lets O7s drop the
answers to statements it injected and synthesise answers to statements it skipped, in order.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import math
import re
import socket
import ssl
import struct
import time
from collections import deque
from typing import TYPE_CHECKING

import trio

from o7s_cluster.backend import BackendConn, BackendError, send_cancel
from o7s_cluster.limits import Bucket, LimitError, Ticket
from o7s_cluster.limits.breaker import MAX_KEY_ORG, BreakerPolicy
from o7s_cluster.admin.metrics import OrgMetrics
from o7s_cluster.usage import UsageCounters
from o7s_cluster.pgwire import errors as codes
from o7s_cluster.pgwire import messages as m
from o7s_cluster.pgwire.errors import ProtocolViolation
from o7s_cluster.pgwire.framing import (
    FRONTEND_TYPES,
    NEWEST_PROTOCOL,
    CancelRequest,
    GSSENCRequest,
    MessageReader,
    SSLRequest,
    StartupMessage,
    parse_startup,
    read_cstring,
    startup_length,
)
from o7s_cluster.pgwire.clienthello import MAX_CLIENT_HELLO, NeedMore, org_from_server_name, server_name
from o7s_cluster.pgwire.scram import MECHANISM, MECHANISM_PLUS, ScramChannelBindingError, ScramError, ScramServer

if TYPE_CHECKING:
    from o7s_cluster.control_plane.catalog import OrgLogin
    from o7s_cluster.pool import Pool
    from o7s_cluster.server import Server

log = logging.getLogger("o7s.session")
_NOBODY = OrgMetrics("_unauthenticated", "none")
_NOBODY_USAGE = UsageCounters(None, "_unauthenticated", "none")

# Expected-response kinds.
K_PARSE, K_BIND, K_DESCRIBE, K_EXECUTE, K_CLOSE, K_SYNC, K_QUERY, K_CAPTURE, K_FAKE, K_FAKE_READY = range(10)
_BIND_ENTRY = (K_BIND, False, None)
_DESCRIBE_ENTRY = (K_DESCRIBE, False, None)
_CLOSE_ENTRY = (K_CLOSE, False, None)
_PARSE_ENTRY = (K_PARSE, False, None)
_CAPTURE_ENTRY = (K_CAPTURE, True, None)

# Settings the server does not report (search_path before PostgreSQL 18, statement_timeout, work_mem...)
# are invisible on the wire. After a statement that may change them, O7s reads the session's own
# settings back, once the client is outside a transaction block, so that they follow the client to its
# next backend and never leak to another client.
_CAPTURE_QUERY = m.query("SELECT name, setting FROM pg_catalog.pg_settings WHERE source = 'session'")
_SETTISH_START = re.compile(rb"\s*(?:set|reset|discard)\b", re.IGNORECASE)
_SETTISH_ANY = re.compile(rb";\s*(?:set|reset|discard)\b|set_config\s*\(", re.IGNORECASE)
_DATA_ROW = ord("D")

# Backend message types the relay looks at; everything else (DataRow above all) passes untouched.
_Z, _PC, _BC, _CC, _T, _NODATA, _CMD, _EMPTY, _SUSP, _ERR, _PSTATUS = b"Z123TnCIsES"
_INTERESTING = frozenset(b"Z123TnCIsES")
_DONE_EXECUTE = frozenset((_CMD, _EMPTY, _SUSP))

MAX_PREPARED_PER_BACKEND = 256   # server-side statements a backend keeps before O7s closes old ones
MAX_PREPARED_PER_CLIENT = 10000  # named statements one client may hold
_I32 = struct.Struct("!i")
_PLUS = MECHANISM_PLUS.encode()

# Parameters the server reports (GUC_REPORT) and a client may change: they follow the client from
# backend to backend. Read-only reported ones (server_version, is_superuser...) are left alone.
SYNCED_PARAMS = {
    "application_name": "application_name",
    "client_encoding": "client_encoding",
    "datestyle": "DateStyle",
    "intervalstyle": "IntervalStyle",
    "timezone": "TimeZone",
    "standard_conforming_strings": "standard_conforming_strings",
    "default_transaction_read_only": "default_transaction_read_only",
    "search_path": "search_path",
}
_SYNCED_REPORTED = frozenset(SYNCED_PARAMS.values())
_GUC_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,62}\Z")
_ORG_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}\Z")
_DEALLOCATE = re.compile(rb"\s*deallocate\s+(?:prepare\s+)?(\"(?:[^\"]|\"\")+\"|[A-Za-z_][A-Za-z0-9_$]*)\s*;?\s*\Z",
                         re.IGNORECASE)
# Startup parameters that are O7s's own business, never applied on a backend.
_STARTUP_RESERVED = frozenset(("user", "database", "options", "replication"))


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """The error that ended a session's nursery (its two tasks fail for one cause)."""
    leaves: list[BaseException] = []

    def walk(g: BaseExceptionGroup) -> None:
        for exc in g.exceptions:
            walk(exc) if isinstance(exc, BaseExceptionGroup) else leaves.append(exc)

    walk(group)
    for exc in leaves:
        if not isinstance(exc, trio.Cancelled):
            return exc
    return group


class ClientError(Exception):
    """An error to send to the client, FATAL (then close) unless `fatal` is False."""

    def __init__(self, code: str, message: str, *, hint: str | None = None, fatal: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint
        self.fatal = fatal

    def to_bytes(self) -> bytes:
        return m.error_response("FATAL" if self.fatal else "ERROR", self.code, self.message, hint=self.hint)


def _parse_options(options: str) -> dict[str, str]:
    """`-c name=value` / `--name=value` settings from a startup `options` string (libpq escapes spaces with \\)."""
    words: list[str] = []
    cur: list[str] = []
    escaped = False
    for ch in options:
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch.isspace():
            if cur:
                words.append("".join(cur))
                cur = []
        else:
            cur.append(ch)
    if cur:
        words.append("".join(cur))
    out: dict[str, str] = {}
    i = 0
    while i < len(words):
        w = words[i]
        if w == "-c" and i + 1 < len(words):
            setting = words[i + 1]
            i += 2
        elif w.startswith("-c"):
            setting = w[2:]
            i += 1
        elif w.startswith("--"):
            setting = w[2:]
            i += 1
        else:
            raise ClientError(codes.FEATURE_NOT_SUPPORTED, f"unsupported startup option \"{w}\"")
        name, sep, value = setting.partition("=")
        if not sep:
            raise ClientError(codes.PROTOCOL_VIOLATION, f"invalid startup option \"{setting}\": expected name=value")
        out[name.replace("-", "_")] = value
    return out


def _login_blocked(org: str, address: str, left: float, policy: BreakerPolicy) -> ClientError:
    """The login breaker's refusal: the limit, and when to retry (in seconds and as a UTC time)."""
    wait = max(1, math.ceil(left))
    at = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=wait)).strftime("%H:%M:%S")
    return ClientError(
        codes.LOGIN_BLOCKED,
        f'too many failed logins for org "{org[:MAX_KEY_ORG]}" from {address}: {policy.failures_max} within '
        f"{policy.window:g} s; logins for this org from this address are refused for {policy.block:g} s",
        hint=f"Retry after {wait} s (at {at} UTC) with the right password.")


def _param_key(name: str) -> str:
    """Reported parameters by the server's spelling, others lower-cased."""
    return SYNCED_PARAMS.get(name.lower(), name.lower())


def _sql_literal(value: str) -> str:
    return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _statement_key(parse_rest: bytes) -> bytes:
    """Server-side name of a statement: the same query text and types share one prepared statement."""
    return b"o7s_" + hashlib.blake2b(parse_rest, digest_size=12).hexdigest().encode()


class Session:
    __slots__ = (
        "server", "settings", "client", "peer", "creader", "send_lock", "backend", "pool", "expect",
        "unsynced", "tx_status", "statements", "client_params", "skip_until_sync", "org", "login",
        "db_name", "user", "pid", "secret", "transaction_mode", "tls", "_pending", "settings_dirty",
        "_captured", "tls_pending", "handed_off", "draining", "scope", "metrics", "usage", "bucket", "ticket",
        "_q_rows", "_q_ok", "_attached_at", "skip_forward_sync", "lazy_sync", "cbind",
    )

    def __init__(self, server: Server, stream: trio.abc.Stream, peer: str, *, preread: bytes = b"",
                 tls_pending: bool = False, handed_off: bool = False) -> None:
        self.server = server
        self.settings = server.settings
        self.client: trio.abc.Stream = stream
        self.peer = peer
        self.creader = MessageReader(self.settings.max_message_size, FRONTEND_TYPES)
        self.send_lock = trio.StrictFIFOLock()
        self.backend: BackendConn | None = None
        self.pool: Pool | None = None
        self.expect: deque[tuple[int, bool, bytes | None]] = deque()
        self.unsynced = False
        self.tx_status = b"I"
        self.statements: dict[bytes, tuple[bytes, bytes, bool]] = {}  # name -> (server key, Parse rest, settish)
        self.client_params: dict[str, str] = {}
        self.skip_until_sync = False
        self.org = ""
        self.login: OrgLogin | None = None
        self.db_name = ""
        self.user = ""
        self.pid = 0
        self.secret = 0
        self.transaction_mode = self.settings.pool_mode == "transaction"
        self.tls = False
        self.cbind: bytes | None = None  # tls-server-end-point data of this TLS connection's certificate
        self._pending = preread  # start-up bytes another worker already read for us
        self.tls_pending = tls_pending  # the SSLRequest was answered 'S' before the hand-off
        self.handed_off = handed_off
        self.draining = False
        self.scope = trio.CancelScope()
        # Counters of whoever this turns out to be; the org's own from login on.
        self.metrics: OrgMetrics = _NOBODY
        self.usage: UsageCounters = _NOBODY_USAGE
        self.bucket: Bucket | None = None
        self.ticket: Ticket | None = None
        self._q_rows = 0  # rows of the simple query in progress (its CommandCompletes)
        self._q_ok = True
        self._attached_at = 0.0
        self.skip_forward_sync = False  # after a refused Execute: the Sync still goes to the backend
        self.lazy_sync = False  # a batch answered here (named Parse) awaits its Sync
        self.settings_dirty = False
        self._captured: dict[str, str] | None = None

    # --- top level ---------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            with self.scope:
                await self._run()
            if self.scope.cancelled_caught:  # drained (SIGTERM, or the drain timeout ran out)
                await self._send_final(m.error_response(
                    "FATAL", codes.ADMIN_SHUTDOWN, "terminating connection due to administrator command",
                    hint="O7s is restarting or scaling down; reconnect."))
        finally:
            with trio.CancelScope(shield=True):
                await self._cleanup()

    def drain(self) -> None:
        """Stop this session once it is between transactions (now, if it already is)."""
        self.draining = True
        conn = self.backend
        if not self.login or (not self.expect and (conn is None or self._clean(conn))):
            self.scope.cancel()

    async def _run(self) -> None:
        try:
            try:
                with trio.fail_after(self.settings.startup_timeout):
                    started = await self._startup()
            except trio.TooSlowError:
                raise ClientError(codes.CONNECTION_FAILURE,
                                  f"start-up and authentication timed out after {self.settings.startup_timeout:g} s") from None
            if started:
                await self._serve()
        except ClientError as exc:
            await self._send_final(exc.to_bytes())
        except ProtocolViolation as exc:
            self.server.metrics.protocol_errors += 1
            await self._send_final(m.error_response("FATAL", codes.PROTOCOL_VIOLATION, f"protocol violation: {exc}"))
        except BackendError as exc:
            conn, self.backend = self.backend, None
            if conn is not None and self.pool is not None:
                self.metrics.backend_connections -= 1
                with trio.CancelScope(shield=True):
                    await self.pool.discard(conn)
            await self._send_final(m.error_response(
                "FATAL", exc.sqlstate if exc.sqlstate.startswith("08") else codes.CONNECTION_FAILURE,
                f"lost the connection to database \"{self.db_name}\": {exc.reason}"))
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError):
            pass  # the client went away
        except Exception:
            # A bug must cost one session, never the worker.
            log.exception("session failed", extra={"org": self.org, "peer": self.peer})
            conn, self.backend = self.backend, None
            if conn is not None and self.pool is not None:
                self.metrics.backend_connections -= 1
                with trio.CancelScope(shield=True):
                    await self.pool.discard(conn)
            await self._send_final(m.error_response("FATAL", codes.INTERNAL_ERROR, "internal error in O7s"))

    async def _send_final(self, data: bytes) -> None:
        """Send a last error, then linger briefly so that unread client bytes do not turn our FIN
        into a reset that would discard the error before the client reads it."""
        with trio.move_on_after(2):
            try:
                await self._send_client(data)
                if isinstance(self.client, trio.SocketStream):
                    await self.client.send_eof()
                    with trio.move_on_after(0.5):
                        drained = 0
                        while drained < 1 << 20 and (chunk := await self.client.receive_some(65536)):
                            drained += len(chunk)
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError, ssl.SSLError, OSError):
                pass

    async def _send_client(self, data: bytes | bytearray) -> None:
        async with self.send_lock:
            await self.client.send_all(data)

    async def _cleanup(self) -> None:
        self.server.unregister(self)
        conn, self.backend = self.backend, None
        if conn is not None and self.pool is not None:
            self.metrics.backend_connections -= 1
            await self._give_back(conn, self.pool)
        if self.login is not None:
            self.metrics.client_connections -= 1
        if self.usage is not _NOBODY_USAGE:
            self.usage.connection_closed()
        if self.ticket is not None:
            self.ticket.release()
        await trio.aclose_forcefully(self.client)

    def _clean(self, conn: BackendConn) -> bool:
        return not self.expect and not self.unsynced and self.tx_status == b"I" and conn.reader.pending() == 0

    async def _give_back(self, conn: BackendConn, pool: Pool) -> None:
        """Return a connection at the end of a session: only clean and idle, else it is closed."""
        if self._clean(conn):
            if not self.transaction_mode:
                try:
                    await conn.query_until_ready("DISCARD ALL")
                except (BackendError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    await pool.discard(conn)
                    return
                conn.applied.clear()
            pool.release(conn)
            return
        if self.expect:  # a query is still running for a client that has gone: stop it
            await send_cancel(conn.target, conn.pid, conn.secret, timeout=2)
        await pool.discard(conn)

    # --- start-up ----------------------------------------------------------------------------

    async def _recv_exact(self, n: int) -> bytes:
        buf = self._pending
        while len(buf) < n:
            chunk = await self.client.receive_some(max(4096, n - len(buf)))
            if not chunk:
                raise trio.BrokenResourceError("client closed during start-up")
            buf += chunk
        self._pending = buf[n:]
        return buf[:n]

    async def _read_typed(self, expected: int) -> bytes:
        """One typed message during authentication."""
        while True:
            msg = self.creader.next()
            if msg is not None:
                t, s, e = msg
                if t != expected:
                    raise ProtocolViolation(f"expected message {chr(expected)!r}, got {chr(t)!r}")
                return self.creader.payload(s, e)
            data = await self.client.receive_some(8192)
            if not data:
                raise trio.BrokenResourceError("client closed during authentication")
            self.creader.feed(data)

    async def _start_tls(self) -> None:
        ctx, self.cbind = self.server.tls_context, self.server.tls_end_point  # one certificate: reloads swap both
        assert ctx is not None
        tls_stream = trio.SSLStream(self.client, ctx, server_side=True)
        await tls_stream.do_handshake()
        self.client = tls_stream
        self.tls = True

    async def _peek_server_name(self) -> str | None:
        """The org from the SNI of the ClientHello still unread in the socket (for TLS hand-off)."""
        sock = getattr(self.client, "socket", None)
        if sock is None:
            return None
        for _ in range(200):
            data = await sock.recv(MAX_CLIENT_HELLO, socket.MSG_PEEK)
            if not data:
                return None
            try:
                return org_from_server_name(server_name(data))
            except NeedMore:
                await trio.sleep(0.005)
        return None

    async def _startup(self) -> bool:
        if self.tls_pending:
            await self._start_tls()
        while True:
            head = await self._recv_exact(4)
            body = await self._recv_exact(startup_length(head) - 4)
            packet = parse_startup(head + body)
            if isinstance(packet, SSLRequest):
                ctx = self.server.tls_context
                if ctx is None or self.tls:
                    await self.client.send_all(b"N")
                    continue
                if self._pending:
                    raise ProtocolViolation("data after SSLRequest before the TLS handshake")
                await self.client.send_all(b"S")
                if not self.handed_off and self.server.router is not None:
                    org = await self._peek_server_name()
                    if org and await self.server.router.hand_off(org, self.client, b"", tls_pending=True):
                        return False
                await self._start_tls()
                continue
            if isinstance(packet, GSSENCRequest):
                await self.client.send_all(b"N")
                continue
            if isinstance(packet, CancelRequest):
                self.server.cancel(packet.pid, packet.secret)
                return False
            assert isinstance(packet, StartupMessage)
            if not self.tls and not self.handed_off and self.server.router is not None:
                org = packet.params["user"].rpartition(".")[2]
                if await self.server.router.hand_off(org, self.client, head + body + self._pending):
                    return False
            break
        if self._pending:
            self.creader.feed(self._pending)
            self._pending = b""
        if packet.needs_negotiation:  # protocol 3.2 (libpq 18) or _pq_ options: go on in 3.0, as PostgreSQL does
            await self._send_client(m.negotiate_protocol_version(NEWEST_PROTOCOL, list(packet.protocol_options)))
        await self._login(packet.params)
        return True

    async def _login(self, params: dict[str, str]) -> None:
        self.user = params["user"]
        self.org = self.user.rpartition(".")[2]
        self.db_name = params.get("database") or self.user
        wanted: dict[str, str] = {}
        if params.get("replication", "false").lower() not in ("false", "off", "0", "no"):
            raise ClientError(codes.FEATURE_NOT_SUPPORTED, "replication connections are not supported by O7s")
        if "options" in params:
            wanted.update(_parse_options(params["options"]))
        for name, value in params.items():
            if name not in _STARTUP_RESERVED and not name.startswith("_pq_."):
                wanted[name] = value
        for name in wanted:
            if not _GUC_NAME.match(name):
                raise ClientError(codes.PROTOCOL_VIOLATION, "invalid startup parameter name")

        login = await self._authenticate()
        self.login = login
        self.metrics = self.server.metrics.org(login.name, login.tier)
        self.metrics.client_connections += 1
        self.server.metrics.sessions_total += 1
        if self.handed_off:
            self.metrics.handoffs_in += 1
        if self.db_name not in login.databases:
            raise ClientError(codes.INVALID_CATALOG_NAME, f"database \"{self.db_name}\" does not exist",
                              hint="Connect to one of the databases registered for your organization.")
        limits = self.server.limits
        try:
            self.ticket = await limits.open_connection(login.org_id, login.name, login.limits)
        except LimitError as exc:
            raise ClientError(exc.code, exc.message, hint=exc.hint) from None
        self.bucket = limits.bucket(login.org_id, login.name, login.limits)
        await self._send_client(m.auth_ok())

        self.pool = await self.server.pool_for(login, self.db_name)
        self.usage = self.server.usage.counters(login.org_id, login.name, self.pool.db_type, tier=login.tier)
        self.usage.connection_opened()
        known = self.pool.server_params
        if self.transaction_mode and known is not None and all(_param_key(k) in _SYNCED_REPORTED for k in wanted):
            # Like PgBouncer: no backend needed to log in. The server's start-up parameters are known
            # from the pool; the client's own (common, reported) settings are applied when it first
            # gets a backend. Anything else (options=-c ..., role...) is checked on a backend now.
            self.client_params = {k: v for k, v in known.items() if k in _SYNCED_REPORTED}
            self.client_params.update((_param_key(k), v) for k, v in wanted.items())
            reported = dict(known)
            reported.update((k, v) for k, v in self.client_params.items() if k in known)
            await self._finish_login(reported)
            return
        try:
            conn = await self._acquire()
        except ClientError as exc:
            exc.fatal = True
            raise
        # What a fresh server connection reports, overlaid with what the client asked for: values an
        # earlier client of this backend set do not leak into this session.
        self.client_params = {k: v for k, v in conn.initial_params.items() if k in _SYNCED_REPORTED}
        self.client_params.update((_param_key(k), v) for k, v in wanted.items())
        try:
            await self._sync_params(conn, at_login=True)
        except BackendError as exc:
            await self.pool.discard(conn)
            raise ClientError(exc.sqlstate, exc.reason.partition(" ")[2] or exc.reason) from None
        except BaseException:
            await self.pool.discard(conn)
            raise
        # From now on the client expects every synced reported value it was told.
        for name, value in conn.params.items():
            if name in _SYNCED_REPORTED:
                self.client_params[name] = value
        if self.transaction_mode:
            self.pool.release(conn)
        else:
            self.backend = conn
            self.metrics.backend_connections += 1
        await self._finish_login(conn.params)

    async def _finish_login(self, reported: dict[str, str]) -> None:
        self.pid, self.secret = self.server.register(self)
        out = bytearray()
        for name, value in reported.items():
            out += m.parameter_status(name, value)
        out += m.backend_key_data(self.pid, self.secret)
        out += m.ready_for_query(b"I")
        await self._send_client(out)

    async def _authenticate(self) -> OrgLogin:
        # The login breaker first, before the control plane or any SCRAM work: the same for every org name,
        # known or not, so it tells nobody which orgs exist.
        address = self.peer.rpartition(":")[0] or self.peer
        guard = self.server.limits.logins
        left = await guard.blocked_for(self.org, address)
        if left > 0:
            self.server.metrics.logins_blocked += 1
            raise _login_blocked(self.org, address, left, guard.policy)
        login: OrgLogin | None = None
        if _ORG_NAME.match(self.org):
            try:
                login = await self.server.catalog.login(self.org)
            except Exception:
                log.exception("control plane lookup failed", extra={"org": self.org})
                raise ClientError(codes.CONTROL_PLANE_UNAVAILABLE,
                                  "O7s cannot reach its control plane to authenticate you; try again shortly") from None
        # On TLS, SCRAM-SHA-256-PLUS first (PostgreSQL's order): channel binding to this certificate.
        cbind = self.cbind if self.tls else None
        mechanisms = [MECHANISM_PLUS, MECHANISM] if cbind is not None else [MECHANISM]
        await self._send_client(m.auth_sasl(mechanisms))
        payload = await self._read_typed(0x70)
        mech, pos = read_cstring(payload, 0)
        if mech.decode("ascii", "replace") not in mechanisms:
            raise ClientError(codes.INVALID_AUTHORIZATION, "O7s supports only SCRAM-SHA-256 authentication"
                              + (" (and SCRAM-SHA-256-PLUS on TLS)" if cbind is not None else ""))
        if len(payload) < pos + 4:
            raise ProtocolViolation("malformed SASLInitialResponse")
        (n,) = _I32.unpack_from(payload, pos)
        data = payload[pos + 4:]
        if n != len(data):
            raise ProtocolViolation("malformed SASLInitialResponse length")
        failed = ClientError(codes.INVALID_PASSWORD, f"password authentication failed for user \"{self.user}\"")
        try:
            scram = ScramServer(login.verifier if login else None, mock_secret=self.server.mock_secret,
                                username_hint=self.org, channel_binding=cbind, plus=mech == _PLUS)
            await self._send_client(m.auth_sasl_continue(scram.handle_client_first(data)))
            final = scram.handle_client_final(await self._read_typed(0x70))
        except ScramChannelBindingError as exc:  # a downgrade or a binding to another certificate
            await self._login_failed(address)
            raise ClientError(codes.PROTOCOL_VIOLATION, str(exc)) from None
        except ScramError:
            await self._login_failed(address)
            raise failed from None
        if login is None:
            await self._login_failed(address)
            raise failed
        await self._send_client(m.auth_sasl_final(final))
        return login

    async def _login_failed(self, address: str) -> None:
        self.server.metrics.auth_failures += 1
        self.server.usage.auth_failure(self.org)
        with trio.CancelScope(shield=True):  # counted even when the start-up timeout hits now
            if await self.server.limits.logins.failed(self.org, address) is not None:
                self.server.metrics.login_blocks += 1

    # --- backend attachment --------------------------------------------------------------------

    async def _acquire(self) -> BackendConn:
        pool = self.pool
        assert pool is not None
        if pool.would_wait():
            self.metrics.pool_waits += 1
            started = time.perf_counter()
            try:
                return await self._acquire_from(pool)
            finally:
                self.metrics.pool_wait_seconds += time.perf_counter() - started
        return await self._acquire_from(pool)

    async def _acquire_from(self, pool: Pool) -> BackendConn:
        try:
            return await pool.acquire()
        except BackendError as exc:
            raise ClientError(exc.sqlstate, f"could not connect to database \"{self.db_name}\": {exc.reason}",
                              fatal=False) from None

    async def _sync_params(self, conn: BackendConn, at_login: bool = False) -> None:
        """Make the backend's session settings the client's: one round trip, only when they differ."""
        stmts: list[str] = []
        for name, value in self.client_params.items():
            reported = name in conn.params
            current = conn.params[name] if reported else conn.applied.get(name)
            if current != value:
                stmts.append(f"pg_catalog.set_config('{name}', {_sql_literal(value)}, false)")
                if not reported:
                    conn.applied[name] = value
        resets = [name for name in conn.applied if name not in self.client_params]
        if not stmts and not resets:
            return
        sql = ("SELECT " + ", ".join(stmts) + ";") if stmts else ""
        for name in resets:
            sql += f"RESET {name};"
            del conn.applied[name]
        try:
            await conn.query_until_ready(sql, timeout=self.settings.server_connect_timeout)
        except BaseException:
            conn.applied.clear()
            raise

    async def _attach(self) -> BackendConn:
        conn = await self._acquire()
        try:
            await self._sync_params(conn)
        except BackendError as exc:
            assert self.pool is not None
            await self.pool.discard(conn)
            # Most likely a start-up setting of the client's that the server refuses: drop the client's
            # settings so that the session stays usable, and say so.
            known = self.pool.server_params or {}
            self.client_params = {k: v for k, v in known.items() if k in _SYNCED_REPORTED}
            raise ClientError(exc.sqlstate, f"could not apply your session settings on database "
                              f"\"{self.db_name}\": {exc.reason.partition(' ')[2] or exc.reason}",
                              hint="Your settings were reset to the server's defaults; SET them again.",
                              fatal=False) from None
        except BaseException:
            assert self.pool is not None
            await self.pool.discard(conn)
            raise
        self.backend = conn
        self.metrics.backend_connections += 1
        self._attached_at = time.perf_counter()
        return conn

    # --- serving -------------------------------------------------------------------------------

    async def _serve(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                if self.backend is not None:  # session mode: attached since login
                    nursery.start_soon(self._relay, self.backend)
                await self._client_loop(nursery)
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise _first_error(group) from None

    async def _client_loop(self, nursery: trio.Nursery) -> None:
        reader = self.creader
        out = bytearray()
        while True:
            while True:
                msg = reader.next()
                if msg is None:
                    break
                t, s, e = msg
                if t == 0x58:  # Terminate
                    if out:
                        await self._flush_backend(out)
                    return
                if self.skip_until_sync:
                    if t != 0x53:
                        continue
                    self.skip_until_sync = False
                    if not self.skip_forward_sync:
                        await self._send_client(m.ready_for_query(self.tx_status))
                        continue
                    self.skip_forward_sync = False  # earlier messages of the batch went to the backend
                elif (t == 0x51 or t == 0x45) and not await self._admit(t):
                    continue
                if (t == 0x51 or t == 0x43) and await self._answer_locally(t, s, e):
                    continue
                conn = self.backend
                if conn is None and self.tx_status == b"I":
                    # A named Parse outside a transaction needs no backend yet: it is prepared where
                    # its Bind or Describe lands. Clients that prepare with a blocking call (libpq's
                    # PQprepare: Parse, Sync) then never wait for a backend just to prepare.
                    if t == 0x50 and await self._parse_locally(s, e):
                        continue
                    if self.lazy_sync and (t == 0x53 or t == 0x48):
                        if t == 0x53:
                            self.lazy_sync = False
                            await self._send_client(m.ready_for_query(self.tx_status))
                        continue
                if conn is None:
                    if out:  # cannot happen: forwarded messages keep their backend attached
                        raise AssertionError("pending output without a backend")
                    try:
                        conn = await self._attach()
                    except ClientError as exc:
                        self.metrics.errors += 1
                        await self._send_client(exc.to_bytes())
                        if t in (0x51, 0x46):  # Query, FunctionCall: answered here
                            await self._send_client(m.ready_for_query(self.tx_status))
                        elif t != 0x53:
                            self.skip_until_sync = True
                        else:
                            await self._send_client(m.ready_for_query(self.tx_status))
                        continue
                    nursery.start_soon(self._relay, conn)
                    self.lazy_sync = False  # the batch's Sync goes to the backend now
                await self._forward(conn, t, s, e, out)
            if out:
                await self._flush_backend(out)
            data = await self.client.receive_some(65536)
            if not data:
                return
            self.metrics.bytes_in += len(data)
            self.usage.bytes_in += len(data)
            reader.feed(data)

    async def _admit(self, t: int) -> bool:
        """The org's query rate: a token now (the usual case, no wait), a wait for one, or a refusal."""
        bucket = self.bucket
        assert bucket is not None
        if bucket.stock > 0:
            await bucket.admit(False)
            return True
        in_transaction = self.tx_status != b"I"
        try:
            await bucket.admit(in_transaction)
        except LimitError as exc:
            self.metrics.refused += 1
            self.usage.refused += 1
            error = m.error_response("ERROR", exc.code, exc.message, hint=exc.hint)
            if t == 0x51:
                await self._fake(error, K_FAKE_READY)
            else:  # Execute: the rest of its batch is skipped, as after any error
                await self._fake(error)
                self.skip_until_sync = True
                self.skip_forward_sync = self.backend is not None and self.unsynced
            return False
        self.metrics.throttled += 1
        self.usage.throttled += 1
        return True

    async def _flush_backend(self, out: bytearray) -> None:
        conn = self.backend
        assert conn is not None
        try:
            await conn.send(out)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            raise BackendError("the database server closed the connection") from None
        finally:
            out.clear()

    async def _fake(self, data: bytes, kind: int = K_FAKE) -> None:
        """Answer the client ourselves, after every response still owed to it."""
        if self.expect:
            self.expect.append((kind, False, data))
        else:
            if kind == K_FAKE_READY:
                data = data + m.ready_for_query(self.tx_status)
            await self._send_client(data)

    def _prepare_on(self, conn: BackendConn, name: bytes, out: bytearray) -> bytes:
        """Server-side name for a client's statement, injecting its Parse if this backend lacks it."""
        key, rest, _settish = self.statements[name]
        prepared = conn.prepared
        if key in prepared:
            prepared.move_to_end(key)
            return key
        self._make_room(conn, out)
        out += m.parse(key, rest)
        self.expect.append((K_PARSE, True, key))
        prepared[key] = None
        return key

    def _make_room(self, conn: BackendConn, out: bytearray) -> None:
        if len(conn.prepared) >= MAX_PREPARED_PER_BACKEND:
            old, _ = conn.prepared.popitem(last=False)
            out += m.close_statement(old)
            self.expect.append((K_CLOSE, True, None))

    async def _forward(self, conn: BackendConn, t: int, s: int, e: int, out: bytearray) -> None:
        buf = self.creader.buf
        expect = self.expect
        if t == 0x51:  # Query
            expect.append((K_QUERY, False, time.perf_counter()))
            self.metrics.queries += 1
            out += buf[s:e]
            if self.settings_dirty or _SETTISH_START.match(buf, s + 5, e) or _SETTISH_ANY.search(buf, s + 5, e):
                self.settings_dirty = True
                out += _CAPTURE_QUERY
                expect.append(_CAPTURE_ENTRY)
        elif t == 0x50:  # Parse
            name, rest = m.split_parse(bytes(buf[s + 5: e]))
            self.unsynced = True
            if not name:
                expect.append(_PARSE_ENTRY)
                out += buf[s:e]
                if _SETTISH_START.match(rest) or _SETTISH_ANY.search(rest):
                    self.settings_dirty = True
                return
            if name not in self.statements and len(self.statements) >= MAX_PREPARED_PER_CLIENT:
                raise ClientError(codes.PROGRAM_LIMIT_EXCEEDED,
                                  f"too many prepared statements (limit {MAX_PREPARED_PER_CLIENT} per connection)")
            key = _statement_key(rest)
            self.statements[name] = (key, rest, bool(_SETTISH_START.match(rest) or _SETTISH_ANY.search(rest)))
            if key in conn.prepared:
                conn.prepared.move_to_end(key)
                await self._fake(m.parse_complete())
                return
            self._make_room(conn, out)
            out += m.parse(key, rest)
            expect.append((K_PARSE, False, key))
            conn.prepared[key] = None
        elif t == 0x42:  # Bind
            payload = bytes(buf[s + 5: e])
            portal, stmt, pos = m.split_bind(payload)
            self.unsynced = True
            if stmt and stmt in self.statements:
                if self.statements[stmt][2]:
                    self.settings_dirty = True
                key = self._prepare_on(conn, stmt, out)
                body = portal + b"\x00" + key + b"\x00" + payload[pos:]
                out += b"B" + _I32.pack(len(body) + 4) + body
            else:
                out += buf[s:e]
            expect.append(_BIND_ENTRY)
        elif t == 0x45:  # Execute
            self.metrics.queries += 1
            self.unsynced = True
            expect.append((K_EXECUTE, False, time.perf_counter()))
            out += buf[s:e]
        elif t == 0x53:  # Sync
            self.unsynced = False
            expect.append((K_SYNC, False, time.perf_counter()))
            out += buf[s:e]
            if self.settings_dirty:
                out += _CAPTURE_QUERY
                expect.append(_CAPTURE_ENTRY)
        elif t == 0x44:  # Describe
            kind, name = m.split_describe_close(bytes(buf[s + 5: e]))
            self.unsynced = True
            if kind == 0x53 and name in self.statements:
                key = self._prepare_on(conn, name, out)
                body = b"S" + key + b"\x00"
                out += b"D" + _I32.pack(len(body) + 4) + body
            else:
                out += buf[s:e]
            expect.append(_DESCRIBE_ENTRY)
        elif t == 0x43:  # Close (of a statement O7s does not own, or of a portal)
            self.unsynced = True
            expect.append(_CLOSE_ENTRY)
            out += buf[s:e]
        elif t == 0x48:  # Flush
            self.unsynced = True
            out += buf[s:e]
        elif t in (0x64, 0x63, 0x66):  # CopyData, CopyDone, CopyFail
            out += buf[s:e]
        elif t == 0x46:  # FunctionCall
            expect.append((K_QUERY, False, time.perf_counter()))
            out += buf[s:e]
        else:
            raise ProtocolViolation(f"unexpected message type {chr(t)!r}")

    async def _parse_locally(self, s: int, e: int) -> bool:
        name, rest = m.split_parse(bytes(self.creader.buf[s + 5: e]))
        if not name:
            return False
        if name not in self.statements and len(self.statements) >= MAX_PREPARED_PER_CLIENT:
            return False  # _forward refuses it with the limit's error
        self.statements[name] = (_statement_key(rest), rest,
                                 bool(_SETTISH_START.match(rest) or _SETTISH_ANY.search(rest)))
        self.lazy_sync = True
        await self._send_client(m.parse_complete())
        return True

    async def _answer_locally(self, t: int, s: int, e: int) -> bool:
        """Close or DEALLOCATE of a protocol-level statement: O7s owns those names, so it answers.

        The server-side statement may serve other clients of the pool: it stays, the name goes.
        """
        buf = self.creader.buf
        if t == 0x43:
            kind, name = m.split_describe_close(bytes(buf[s + 5: e]))
            if kind != 0x53 or name not in self.statements:
                return False
            del self.statements[name]
            self.unsynced = True
            await self._fake(m.close_complete())
            return True
        if not buf[s + 5: s + 16].lstrip().lower().startswith(b"dealloc"):
            return False
        return await self._deallocate(bytes(buf[s + 5: e - 1]))

    async def _deallocate(self, sql: bytes) -> bool:
        """`DEALLOCATE name` of a protocol-level statement: O7s owns those names, so it answers itself."""
        match = _DEALLOCATE.match(sql)
        if not match:
            return False
        word = match.group(1)
        if word.lower() == b"all":
            self.statements.clear()
            return False  # the server drops its statements too; the relay sees the tag and forgets them
        name = word[1:-1].replace(b'""', b'"') if word.startswith(b'"') else word.lower()
        if name not in self.statements:
            return False  # maybe an SQL-level PREPARE: the server knows it
        del self.statements[name]
        await self._fake(m.command_complete("DEALLOCATE"), K_FAKE_READY)
        return True

    async def _relay(self, conn: BackendConn) -> None:
        """Backend → client until the backend is given back (transaction mode) or the session ends."""
        reader = conn.reader
        expect = self.expect
        out = bytearray()
        interesting = _INTERESTING
        capturing = False
        metrics = self.metrics
        while True:
            await conn.receive_messages()
            buf = reader.buf
            seg = reader.pos
            while True:
                msg = reader.next()
                if msg is None:
                    break
                t, s, e = msg
                if capturing:
                    # Everything the settings read-back says is O7s's, not the client's.
                    out += buf[seg:s]
                    seg = e
                    if not self._capture(conn, t, bytes(buf[s + 5:e])):
                        continue
                    expect.popleft()
                    capturing = bool(expect) and expect[0][0] == K_CAPTURE
                    if capturing:
                        self._captured = {}
                    elif expect and expect[0][0] >= K_FAKE:
                        self._drain_fakes(out)
                    continue
                if t not in interesting:
                    continue
                swallow = False
                popped = False
                if t == _Z:
                    if expect:
                        kind, _sw, started = expect.popleft()
                        popped = True
                        if started is not None:
                            took = time.perf_counter() - started  # type: ignore[operator]
                            metrics.observe_latency(took)
                            if kind == K_QUERY:
                                self.usage.query_done(took, self._q_rows, self._q_ok)
                                self._q_rows = 0
                                self._q_ok = True
                    self.tx_status = bytes(buf[s + 5: s + 6])
                elif t == _PC or t == _BC or t == _CC:
                    if expect:
                        swallow = expect.popleft()[1]
                        popped = True
                elif t == _T or t == _NODATA:
                    if expect and expect[0][0] == K_DESCRIBE:
                        expect.popleft()
                        popped = True
                elif t in _DONE_EXECUTE:
                    rows = self._on_command_tag(conn, buf[s + 5: e - 1]) if t == _CMD else 0
                    if expect:
                        front = expect[0][0]
                        if front == K_EXECUTE:
                            self.usage.query_done(time.perf_counter() - expect.popleft()[2], rows, True)
                            popped = True
                        elif front == K_QUERY:
                            self._q_rows += rows
                elif t == _ERR:
                    metrics.errors += 1
                    front = expect[0][0] if expect else -1
                    if front == K_QUERY:
                        self._q_ok = False
                    elif front != -1:
                        if front == K_EXECUTE:
                            self.usage.query_done(time.perf_counter() - expect[0][2], 0, False)
                        # The server skips everything up to the next Sync.
                        while expect and expect[0][0] != K_SYNC:
                            kind, _sw, key = expect.popleft()
                            if kind == K_PARSE and key is not None:
                                conn.prepared.pop(key, None)
                elif t == _PSTATUS:
                    name, value = m.parse_parameter_status(bytes(buf[s + 5: e]))
                    conn.params[name] = value
                    if name in _SYNCED_REPORTED:
                        self.client_params[name] = value
                if swallow:
                    out += buf[seg:s]
                    seg = e
                if popped and expect:
                    front = expect[0][0]
                    if front >= K_FAKE:
                        out += buf[seg:e]
                        seg = e
                        self._drain_fakes(out)
                    elif front == K_CAPTURE:
                        out += buf[seg:e]
                        seg = e
                        capturing = True
                        self._captured = {}
            out += buf[seg:reader.pos]
            if out:
                metrics.bytes_out += len(out)
                self.usage.bytes_out += len(out)
                await self._send_client(out)
                out.clear()
            if self._clean(conn):
                if self.draining:
                    self.scope.cancel()
                if self.transaction_mode and self.backend is conn:
                    self.backend = None
                    metrics.backend_connections -= 1
                    self.usage.backend_seconds += time.perf_counter() - self._attached_at
                    assert self.pool is not None
                    self.pool.release(conn)
                    return

    def _drain_fakes(self, out: bytearray) -> None:
        expect = self.expect
        while expect and expect[0][0] >= K_FAKE:
            kind, _sw, data = expect.popleft()
            out += data  # type: ignore[operator]
            if kind == K_FAKE_READY:
                out += m.ready_for_query(self.tx_status)

    def _capture(self, conn: BackendConn, t: int, payload: bytes) -> bool:
        """One message of the settings read-back; True at its end (ReadyForQuery)."""
        captured = self._captured
        if t == _DATA_ROW and captured is not None and len(payload) >= 2:
            pos, values = 2, []
            for _ in range(2):
                (n,) = _I32.unpack_from(payload, pos)
                values.append(payload[pos + 4: pos + 4 + n].decode("utf-8", "replace") if n >= 0 else "")
                pos += 4 + max(n, 0)
            name = values[0]
            # Reported parameters follow through ParameterStatus; the rest through this read-back.
            if SYNCED_PARAMS.get(name, name) not in conn.params and not name.startswith("transaction_"):
                captured[name] = values[1]
        elif t == _ERR:
            self._captured = None  # unusable: try again after the next statement
        elif t == _PSTATUS:
            name, value = m.parse_parameter_status(payload)
            conn.params[name] = value
        elif t == _Z:
            # Only a read-back outside a transaction block is final: a rollback may still undo a SET.
            if captured is not None and payload[:1] == b"I":
                for name in [n for n in self.client_params if n not in conn.params]:
                    del self.client_params[name]
                self.client_params.update(captured)
                conn.applied = dict(captured)
                self.settings_dirty = False
            self._captured = None
            return True
        return False

    def _on_command_tag(self, conn: BackendConn, tag: bytearray) -> int:
        """Rows of a CommandComplete tag (`SELECT 3`, `INSERT 0 5`); forgets statements on DISCARD ALL."""
        if tag == b"DISCARD ALL" or tag == b"DEALLOCATE ALL":
            conn.prepared.clear()
            return 0
        space = tag.rfind(b" ")
        if space < 0:
            return 0
        last = tag[space + 1:]
        return int(last) if last.isdigit() else 0

    def cancel(self) -> None:
        """A CancelRequest with this session's key arrived: pass it to the backend running its query."""
        conn = self.backend
        if conn is not None and self.expect:
            self.server.spawn(send_cancel, conn.target, conn.pid, conn.secret)
