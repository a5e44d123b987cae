"""Start-up and login of one client: SSL and cancel requests, hand-off to the org's home worker,
SCRAM-SHA-256 against the control plane (or, for the user `token.ORG`, a JWT or API key asked for as a
cleartext password, over TLS only unless allowed), the org's limits, and its first backend (session mode).

Everything a client sends before it has authenticated is capped to what it can legitimately be,
and what all such clients hold in a worker is bounded in total (`PreAuthBudget`).
"""

from __future__ import annotations

import datetime
import logging
import math
import re
import socket
from typing import TYPE_CHECKING

import trio

from o7s_cluster.auth.apikeys import check_key, key_prefix, looks_like_key
from o7s_cluster.auth.tokens import MAX_TOKEN, TokenRejected
from o7s_cluster.limits.errors import LimitError
from o7s_cluster.limits.breaker import MAX_KEY_ORG, BreakerPolicy, Trip
from o7s_cluster.net.backend import BackendConn, BackendError
from o7s_cluster.net.channel import AnyChannel, Channel, TLSChannel
from o7s_cluster.pgwire import errors as codes
from o7s_cluster.pgwire import messages as m
from o7s_cluster.pgwire.clienthello import MAX_CLIENT_HELLO, NeedMore, org_from_server_name, server_name
from o7s_cluster.pgwire.errors import ClientError, ProtocolViolation
from o7s_cluster.pgwire.framing import (
    NEWEST_PROTOCOL,
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    parse_startup,
    read_cstring,
    startup_length,
)
from o7s_cluster.pgwire.scram import MECHANISM, MECHANISM_PLUS, ScramChannelBindingError, ScramError, ScramServer
from o7s_cluster.proxy.params import SYNCED_REPORTED, normalize_value, param_key, sync_sql, wanted_settings
from o7s_cluster.usage.audit import BREAKER_TRIP

if TYPE_CHECKING:
    from o7s_cluster.control_plane.catalog import OrgLogin
    from o7s_cluster.limits.bucket import Bucket
    from o7s_cluster.limits.gate import Ticket
    from o7s_cluster.net.pool import Pool
    from o7s_cluster.worker.server import Server

log = logging.getLogger("o7s.login")

# A SASL message is a hundred bytes or so (PostgreSQL caps authentication tokens at 64 KiB).
MAX_AUTH_MESSAGE = 8192
_SASL_RESPONSE = 0x70
_PLUS = MECHANISM_PLUS.encode()
_ORG_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}\Z")
TOKEN_USER = "token"  # user `token.ORG`: the password is a JWT or an API key (asked for in clear text)


def _login_blocked(org: str, address: str, left: float, policy: BreakerPolicy) -> ClientError:
    """The login breaker's refusal: the limit, and when to retry (in seconds and as a UTC time)."""
    wait = max(1, math.ceil(left))
    at = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=wait)).strftime("%H:%M:%S")
    return ClientError(
        codes.LOGIN_BLOCKED,
        f'too many failed logins for org "{org[:MAX_KEY_ORG]}" from {address}: {policy.failures_max} within '
        f"{policy.window:g} s; logins for this org from this address are refused for {policy.block:g} s",
        hint=f"Retry after {wait} s (at {at} UTC) with the right password.")


class Login:
    """The start-up of one connection. After `run` returns True the client is logged in: the fields
    below say who it is, and (session mode) `conn` is its backend."""

    def __init__(self, server: Server, channel: AnyChannel, peer: str, *, preread: bytes = b"",
                 tls_pending: bool = False, handed_off: bool = False, owner: object = None) -> None:
        self.server = server
        self.settings = server.settings
        self.channel = channel
        self.peer = peer
        self.pending = bytearray(preread)  # start-up bytes already read (by us or by another worker)
        self.tls_pending = tls_pending  # the SSLRequest was answered 'S' before the hand-off
        self.handed_off = handed_off
        self.owner = owner  # the session, registered under the BackendKeyData it is given
        self.tls = False
        self.cbind: bytes | None = None  # tls-server-end-point data of this TLS connection's certificate
        self.user = ""
        self.org = ""
        self.db_name = ""
        self.login: OrgLogin | None = None
        self.method = "password"  # how the client logged in: password, jwt or apikey
        self.wanted: dict[str, str] = {}
        self.client_params: dict[str, str] = {}
        self.pool: Pool | None = None
        self.conn: BackendConn | None = None
        self.ticket: Ticket | None = None
        self.bucket: Bucket | None = None
        self.pid = 0
        self.secret = 0
        self._held = 0  # bytes counted in the worker's pre-authentication budget

    # --- the budget ------------------------------------------------------------------------

    def _hold(self, n: int) -> None:
        self.server.preauth.take(n)
        self._held += n

    def release_budget(self) -> None:
        if self._held:
            self.server.preauth.give(self._held)
            self._held = 0

    # --- reading ---------------------------------------------------------------------------

    async def _fill(self, n: int) -> None:
        """At least `n` bytes in `pending` (n is capped by the caller)."""
        while len(self.pending) < n:
            data = await self.channel.receive()
            if not data:
                raise trio.BrokenResourceError("client closed during start-up")
            self._hold(len(data))
            self.pending += data

    async def _take(self, n: int) -> bytes:
        await self._fill(n)
        out = bytes(self.pending[:n])
        del self.pending[:n]
        return out

    async def _read_auth(self, limit: int = MAX_AUTH_MESSAGE) -> bytes:
        """One SASL response (or password) message, its length capped before anything is buffered for it."""
        head = await self._take(5)
        if head[0] != _SASL_RESPONSE:
            raise ProtocolViolation(f"expected SASL response message, got {chr(head[0])!r}")
        length = int.from_bytes(head[1:5], "big", signed=True)
        if length < 4 or length > limit:
            raise ProtocolViolation(f"invalid authentication message length {length} (limit {limit})")
        return await self._take(length - 4)

    async def _send(self, data: bytes) -> None:
        await self.channel.send(bytearray(data))

    # --- start-up --------------------------------------------------------------------------

    async def run(self) -> bool:
        """False when there is no session to serve (a cancel request, or handed to another worker)."""
        if self.tls_pending:
            await self._start_tls()
        self._hold(len(self.pending))
        while True:
            head = await self._take(4)
            body = await self._take(startup_length(head) - 4)
            packet = parse_startup(head + body)
            if isinstance(packet, SSLRequest):
                ctx = self.server.tls_context
                if ctx is None or self.tls:
                    await self._send(b"N")
                    continue
                if self.pending:
                    raise ProtocolViolation("data after SSLRequest before the TLS handshake")
                await self._send(b"S")
                router = self.server.router
                if not self.handed_off and router is not None and isinstance(self.channel, Channel):
                    org = await self._peek_server_name()
                    if org and await router.hand_off(org, self.channel.sock, b"", tls_pending=True):
                        return False
                await self._start_tls()
                continue
            if isinstance(packet, GSSENCRequest):
                await self._send(b"N")
                continue
            if isinstance(packet, CancelRequest):
                self.server.cancel(packet.pid, packet.secret)
                return False
            assert isinstance(packet, StartupMessage)
            router = self.server.router
            if not self.tls and not self.handed_off and router is not None and isinstance(self.channel, Channel):
                org = packet.params["user"].rpartition(".")[2]
                if await router.hand_off(org, self.channel.sock, head + body + bytes(self.pending)):
                    return False
            break
        if packet.needs_negotiation:  # protocol 3.2 (libpq 18) or _pq_ options: go on in 3.0, as PostgreSQL does
            await self._send(m.negotiate_protocol_version(NEWEST_PROTOCOL, list(packet.protocol_options)))
        await self._log_in(packet.params)
        return True

    async def _start_tls(self) -> None:
        ctx, self.cbind = self.server.tls_context, self.server.tls_end_point  # one certificate: reloads swap both
        assert ctx is not None and isinstance(self.channel, Channel)
        sock = self.channel.sock
        stream = trio.SSLStream(trio.SocketStream(trio.socket.from_stdlib_socket(sock)), ctx, server_side=True)
        await stream.do_handshake()
        self.channel = TLSChannel(stream, sock)
        self.tls = True

    async def _peek_server_name(self) -> str | None:
        """The org from the SNI of the ClientHello still unread in the socket (for TLS hand-off)."""
        assert isinstance(self.channel, Channel)
        sock = self.channel.sock
        for _ in range(200):
            try:
                data = sock.recv(MAX_CLIENT_HELLO, socket.MSG_PEEK)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            if not data:
                return None
            try:
                return org_from_server_name(server_name(data))
            except NeedMore:
                await trio.sleep(0.005)
        return None

    async def _log_in(self, params: dict[str, str]) -> None:
        self.user = params["user"]
        self.org = self.user.rpartition(".")[2]
        self.db_name = params.get("database") or self.user
        if params.get("replication", "false").lower() not in ("false", "off", "0", "no"):
            raise ClientError(codes.FEATURE_NOT_SUPPORTED, "replication connections are not supported by O7s")
        self.wanted = wanted_settings(params)
        login = await self._authenticate()
        self.login = login
        server = self.server
        server.usage.audit.login(True, login.name, self.user, self._address(), self.method, login.org_id)
        if self.db_name not in login.databases:
            raise ClientError(codes.INVALID_CATALOG_NAME, f"database \"{self.db_name}\" does not exist",
                              hint="Connect to one of the databases registered for your organization.")
        try:
            self.ticket = await server.limits.open_connection(login.org_id, login.name, login.limits)
        except LimitError as exc:
            server.usage.audit.connection_refused(login.name, login.org_id, login.tier)
            raise limit_error(exc) from None
        self.bucket = server.limits.bucket(login.org_id, login.name, login.limits)
        await self._send(m.auth_ok())
        self.release_budget()  # logged in: from now on the session's own caps apply
        await self._take_resources()

    async def _take_resources(self) -> None:
        """The org's connection ticket, its pool, and (session mode, or unusual settings) a backend."""
        login = self.login
        assert login is not None
        server = self.server
        self.pool = await server.pool_for(login, self.db_name)
        pool = self.pool
        transaction_mode = self.settings.pool_mode == "transaction"
        known = pool.server_params
        wanted = self.wanted
        if transaction_mode and known is not None and all(param_key(k) in SYNCED_REPORTED for k in wanted):
            # Like PgBouncer: no backend needed to log in. The server's start-up parameters are known
            # from the pool; the client's own (common, reported) settings are applied when it first
            # gets a backend. Anything else (options=-c ..., role...) is checked on a backend now.
            self.client_params = {k: v for k, v in known.items() if k in SYNCED_REPORTED}
            self.client_params.update((param_key(k), normalize_value(param_key(k), v)) for k, v in wanted.items())
            reported = dict(known)
            reported.update((k, v) for k, v in self.client_params.items() if k in known)
            await self._finish(reported, backend_pid=None)
            return
        try:
            conn = pool.try_acquire() or await pool.acquire()
        except BackendError as exc:
            raise ClientError(exc.sqlstate, f"could not connect to database \"{self.db_name}\": {exc.reason}") from None
        # What a fresh server connection reports, overlaid with what the client asked for: values an
        # earlier client of this backend set do not leak into this session.
        self.client_params = {k: v for k, v in conn.initial_params.items() if k in SYNCED_REPORTED}
        self.client_params.update((param_key(k), v) for k, v in wanted.items())
        try:
            sql = sync_sql(self.client_params, conn.state.settings)
            if sql:
                await conn.query_until_ready(sql, timeout=self.settings.server_connect_timeout)
        except BackendError as exc:
            conn.state.settings.applied.clear()
            await pool.discard(conn)
            raise ClientError(exc.sqlstate, exc.reason.partition(" ")[2] or exc.reason) from None
        except BaseException:
            await pool.discard(conn)
            raise
        # From now on the client expects every synced reported value it was told.
        for name, value in conn.params.items():
            if name in SYNCED_REPORTED:
                self.client_params[name] = value
        if transaction_mode:
            pool.release(conn)
            await self._finish(dict(conn.params), backend_pid=None)
        else:
            self.conn = conn
            await self._finish(dict(conn.params), backend_pid=conn.pid)

    async def _finish(self, reported: dict[str, str], backend_pid: int | None) -> None:
        self.pid, self.secret = self.server.register(self.owner, backend_pid)
        out = bytearray()
        for name, value in reported.items():
            out += m.parameter_status(name, value)
        out += m.backend_key_data(self.pid, self.secret)
        out += m.ready_for_query(b"I")
        await self.channel.send(out)

    async def _authenticate(self) -> OrgLogin:
        server = self.server
        # The login breaker first, before the control plane or any SCRAM work: the same for every org name,
        # known or not, so it tells nobody which orgs exist.
        address = self._address()
        guard = server.limits.logins
        left = await guard.blocked_for(self.org, address)
        if left > 0:
            server.metrics.logins_blocked += 1
            raise _login_blocked(self.org, address, left, guard.policy)
        login: OrgLogin | None = None
        if _ORG_NAME.match(self.org):
            try:
                login = await server.catalog.login(self.org)
            except Exception:
                log.exception("control plane lookup failed", extra={"org": self.org})
                raise ClientError(codes.CONTROL_PLANE_UNAVAILABLE,
                                  "O7s cannot reach its control plane to authenticate you; try again shortly") from None
        if self.user.partition(".")[0] == TOKEN_USER and "." in self.user:
            return await self._token_authenticate(login, address)
        # On TLS, SCRAM-SHA-256-PLUS first (PostgreSQL's order): channel binding to this certificate.
        cbind = self.cbind if self.tls else None
        mechanisms = [MECHANISM_PLUS, MECHANISM] if cbind is not None else [MECHANISM]
        await self._send(m.auth_sasl(mechanisms))
        payload = await self._read_auth()
        mech, pos = read_cstring(payload, 0)
        if mech.decode("ascii", "replace") not in mechanisms:
            raise ClientError(codes.INVALID_AUTHORIZATION, "O7s supports only SCRAM-SHA-256 authentication"
                              + (" (and SCRAM-SHA-256-PLUS on TLS)" if cbind is not None else ""))
        if len(payload) < pos + 4:
            raise ProtocolViolation("malformed SASLInitialResponse")
        n = int.from_bytes(payload[pos:pos + 4], "big", signed=True)
        data = payload[pos + 4:]
        if n != len(data):
            raise ProtocolViolation("malformed SASLInitialResponse length")
        failed = ClientError(codes.INVALID_PASSWORD, f"password authentication failed for user \"{self.user}\"")
        try:
            scram = ScramServer(login.verifier if login else None, mock_secret=server.mock_secret,
                                username_hint=self.org, channel_binding=cbind, plus=mech == _PLUS)
            await self._send(m.auth_sasl_continue(scram.handle_client_first(data)))
            final = scram.handle_client_final(await self._read_auth())
        except ScramChannelBindingError as exc:  # a downgrade or a binding to another certificate
            await self._login_failed(address)
            raise ClientError(codes.PROTOCOL_VIOLATION, str(exc)) from None
        except ScramError:
            await self._login_failed(address)
            raise failed from None
        if login is None:
            await self._login_failed(address)
            raise failed
        await self._send(m.auth_sasl_final(final))
        return login

    async def _token_authenticate(self, login: OrgLogin | None, address: str) -> OrgLogin:
        """A JWT (or API key) as the password: AuthenticationCleartextPassword, on TLS unless allowed."""
        if not self.tls and not self.settings.token_login_plaintext:
            raise ClientError(codes.INVALID_AUTHORIZATION,
                              f'token logins (user "{TOKEN_USER}.ORG") need TLS', hint="Connect with sslmode=require.")
        await self._send(m.auth_cleartext_password())
        payload = await self._read_auth(MAX_TOKEN + 5)
        failed = ClientError(codes.INVALID_PASSWORD, f"password authentication failed for user \"{self.user}\"")
        if not payload.endswith(b"\0") or b"\0" in payload[:-1]:
            raise ProtocolViolation("malformed password message")
        token = payload[:-1].decode("utf-8", "replace")
        self.method = "apikey" if looks_like_key(token) else "jwt"
        role: str | None = None
        try:
            role = await check_token(self.server, self.method, token, self.org, login)
        except ControlPlaneDown:
            raise ClientError(codes.CONTROL_PLANE_UNAVAILABLE,
                              "O7s cannot reach its control plane to authenticate you; try again shortly") from None
        except TokenRejected as exc:  # the reason goes to the log only: the client learns nothing from it
            log.info("token login refused", extra={"org": self.org, "method": self.method, "reason": exc.reason})
            await self._login_failed(address)
            raise failed from None
        assert login is not None
        if role is not None:
            self.wanted["role"] = role  # as `options=-c role=...`: on every backend the session uses
        return login

    def _address(self) -> str:
        return self.peer.rpartition(":")[0] or self.peer

    async def _login_failed(self, address: str) -> None:
        server = self.server
        server.metrics.auth_failures += 1
        server.usage.auth_failure(self.org)
        server.usage.audit.login(False, self.org, self.user, address, self.method)
        with trio.CancelScope(shield=True):  # counted even when the start-up timeout hits now
            trip = await server.limits.logins.failed(self.org, address)
            if trip is not None:
                server.metrics.login_blocks += 1
                audit_trip(server, trip)


class ControlPlaneDown(Exception):
    """The control plane could not be asked about an API key."""


async def check_token(server: Server, method: str, token: str, org: str, login: OrgLogin | None) -> str | None:
    """A JWT or API key (`method` "jwt" or "apikey") of `org`, for the Postgres and the Redis port alike; returns
    the backend role a JWT names (None: the org's own). Raises TokenRejected, whose reason is for the log only,
    or ControlPlaneDown."""
    if method == "apikey":
        try:
            stored = await server.catalog.api_key(key_prefix(token) or "")
        except Exception:
            log.exception("control plane lookup failed", extra={"org": org})
            raise ControlPlaneDown from None
        reason = check_key(token, stored, login.org_id if login else None, datetime.datetime.now(datetime.timezone.utc))
        if reason is not None:
            raise TokenRejected(reason)
        assert stored is not None
        server.nursery.start_soon(_touch_key, server, stored.id)
        return None
    if not server.jwt.enabled:
        raise TokenRejected("JWT logins are not configured")
    role = server.jwt.verify(token, org).role
    if login is None:
        raise TokenRejected("no such org")
    return role


async def _touch_key(server: Server, key_id: str) -> None:
    """An API key's last use: bookkeeping in the background, which never fails a login."""
    try:
        await server.catalog.touch_api_key(key_id)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not record an API key's use", extra={"error": type(exc).__name__})


def audit_trip(server: Server, trip: Trip) -> None:
    """A login breaker trip in the audit log: who was blocked, after how many failures, for how long."""
    block = server.limits.logins.policy.block
    server.usage.audit.add(BREAKER_TRIP, trip.org, source=trip.address,
                           detail={"failures": trip.failures, "block_seconds": block})


def limit_error(exc: LimitError) -> ClientError:
    """The limits' refusal as the error the client gets."""
    return ClientError(exc.code, exc.message, hint=exc.hint, fatal=exc.severity == "FATAL")
