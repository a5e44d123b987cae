"""Backend connections: connect, TLS as the DSN's sslmode says, authenticate, and stay checkable."""

from __future__ import annotations

import errno
import logging
import select
import socket
import ssl
import struct
import time
from collections.abc import Awaitable, Coroutine
from typing import Protocol

import trio

from o7s_cluster.control_plane.dsn import BackendTarget
from o7s_cluster.net.channel import AnyChannel, Channel, TLSChannel
from o7s_cluster.net.poller import Poller
from o7s_cluster.proxy.backend import BackendState
from o7s_cluster.pgwire import messages as m
from o7s_cluster.pgwire.errors import CANNOT_CONNECT_NOW, CONNECTION_FAILURE, ProtocolViolation
from o7s_cluster.pgwire.framing import MessageReader
from o7s_cluster.pgwire.scram import ScramClient, ScramError, md5_password

# Backends are trusted more than clients, but a length is still capped: PostgreSQL's own 1 GiB.
MAX_BACKEND_MESSAGE = 1 << 30
_PEEK_NOW = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)  # an int: or-ing the enum flags costs more than the peek
log = logging.getLogger("o7s.backend")
_I32 = struct.Struct("!i")


class BackendError(Exception):
    """A backend could not be reached or used. `reason` is safe to show the org (no DSN, no secret)."""

    def __init__(self, reason: str, sqlstate: str = CONNECTION_FAILURE) -> None:
        super().__init__(reason)
        self.reason = reason
        self.sqlstate = sqlstate


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError) or exc.errno == errno.ECONNREFUSED:
        return "connection refused"
    if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "host unreachable"
    if isinstance(exc, socket.gaierror):
        return "host name could not be resolved"
    return "network error"


class BackendSink(Protocol):
    """Whoever the bytes a backend sends go to: the session it is attached to, or a housekeeping query."""

    async def backend_data(self, data: memoryview | bytes) -> None:
        """Take what the server sent (b'' when it closed); called by the connection's pump only."""

    def backend_data_now(self, data: memoryview | bytes) -> Awaitable[None] | None:
        """The same without waiting, from the worker's poller: None when done, else what is left to do,
        which the pump awaits (the poller leaves the socket alone meanwhile)."""


_CLOSED = object()  # what the poller hands the pump when the connection is done

class BackendConn:
    """One authenticated server connection. `state` is what the session core knows of it; while a
    cancel aimed at one of its queries may still land, `cancels` is non-zero and the pool holds it back.

    Once pooled, it is read for as long as it is open and what it sends goes to `sink`, so that
    attaching the connection to a session wakes nobody. A plain connection is read by the worker's
    poller, which hands the bytes to the sink in its own task (`net.poller`); the connection's task
    (`pump`) only finishes what the sink could not do without waiting. A TLS connection's pump reads it.
    """

    __slots__ = ("stream", "raw", "tls", "channel", "reader", "state", "pid", "secret", "target",
                 "created", "last_used", "cancels", "parked", "pool", "sink", "dead", "poller", "_fd",
                 "_handler", "_rest", "_lot", "_closing", "_probe")

    def __init__(self, stream: trio.abc.Stream, raw: socket.socket, tls: bool, target: BackendTarget) -> None:
        self.stream = stream
        self.raw = raw
        self.tls = tls
        self.target = target
        self.channel: AnyChannel = TLSChannel(stream, raw) if tls else Channel(raw)  # type: ignore[arg-type]
        self._probe = select.poll()  # what `looks_alive` asks
        self._probe.register(raw, select.POLLIN)
        self.reader = MessageReader(MAX_BACKEND_MESSAGE)  # housekeeping statements only
        self.state = BackendState()
        self.pid = 0
        self.secret = 0
        self.cancels = 0
        self.parked = False  # given back while a cancel was in flight: the pool takes it when that lands
        self.pool: object = None
        self.sink: BackendSink | None = None
        self.dead = False  # the server closed it, or spoke while nobody was attached: never hand it out
        self.created = self.last_used = time.monotonic()
        self.poller: Poller | None = None  # the worker's, once pooled (plain connections only)
        self._fd = -1
        self._handler = self._on_readable
        self._rest: Awaitable[None] | object | None = None  # what the pump is to finish next
        self._lot = trio.lowlevel.ParkingLot()
        self._closing = False

    @property
    def params(self) -> dict[str, str]:
        return self.state.settings.reported

    @property
    def initial_params(self) -> dict[str, str]:
        return self.state.settings.initial

    def looks_alive(self) -> bool:
        """Cheap check, no round trip: an idle server connection has nothing to say unless it is gone.

        One poll of its socket, which raises nothing in the usual case (a peek would, costing more than
        the system call itself); only TLS, whose records may carry session tickets, looks closer."""
        if self.dead:
            return False
        if not self._probe.poll(0):
            return True
        if not self.tls:
            return False
        try:
            return bool(self.raw.recv(1, _PEEK_NOW))  # a record, not the end of the stream
        except BlockingIOError:
            return True
        except OSError:
            return False

    async def send(self, data: bytes | bytearray) -> None:
        await self.channel.send(bytearray(data))

    async def receive_messages(self) -> None:
        data = await self.channel.receive()
        if not data:
            raise BackendError("the database server closed the connection")
        self.reader.feed(bytes(data))

    async def aclose(self) -> None:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            try:
                await self.send(m.terminate())
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            if self.tls:
                await trio.aclose_forcefully(self.stream)
            self._stop_polling()
            self.channel.close()

    async def pump(self) -> None:
        """Read the server for as long as the connection is open, for whichever sink is attached.

        Bytes that arrive while nothing is attached mean the server is ending the connection (an idle
        server only speaks to say so): the connection is marked dead and the pool drops it.
        """
        channel = self.channel
        if self.poller is not None and type(channel) is Channel:
            await self._pump_polled(self.poller)
            return
        try:
            while True:
                data = await channel.receive()
                sink = self.sink
                if sink is not None:
                    await sink.backend_data(data)
                elif data:
                    self.dead = True
                if not data:
                    break
        except (trio.ClosedResourceError, trio.BrokenResourceError, OSError):
            sink = self.sink
            if sink is not None:
                await sink.backend_data(b"")
        except Exception:
            # A bug must cost this connection, never the worker whose nursery the pump runs in.
            log.exception("backend connection pump failed")
        finally:
            self.dead = True

    async def _pump_polled(self, poller: Poller) -> None:
        """The pump of a connection the poller reads: it finishes what a sink could not do at once."""
        self._fd = fd = self.raw.fileno()
        poller.add(fd, self._handler)
        try:
            while True:
                while self._rest is None:
                    await self._lot.park()
                rest, self._rest = self._rest, None
                if rest is _CLOSED:
                    break
                await rest  # type: ignore[misc]
                if self._closing:
                    break
                poller.resume(fd)
        except Exception:
            log.exception("backend connection pump failed")
        finally:
            self.dead = True
            self._stop_polling()
            if isinstance(self._rest, Coroutine):  # handed over as the pump was cancelled
                self._rest.close()

    def _on_readable(self) -> None:
        """The poller saw the server's socket ready (in the poller's task: never waits)."""
        data = self.channel.receive_now()  # type: ignore[union-attr]
        if data is None:
            return
        sink = self.sink
        if not data:
            self.dead = True
            self._hand(_CLOSED if sink is None else sink.backend_data(b""), closing=True)
        elif sink is None:
            self.dead = True  # an idle server only speaks to say it is ending the connection
        else:
            rest = sink.backend_data_now(data)
            if rest is not None:
                self._hand(rest)

    def _hand(self, rest: Awaitable[None] | object, closing: bool = False) -> None:
        """Leave the socket to the pump until it has finished `rest` (then it ends, when `closing`)."""
        if self.poller is not None and not self._closing:
            self.poller.pause(self._fd)
        self._closing = self._closing or closing
        self._rest = rest
        self._lot.unpark_all()

    def _stop_polling(self) -> None:
        """Before the socket is closed: the poller forgets it and the pump ends."""
        if self.poller is not None and self._fd >= 0:
            self.poller.remove(self._fd, self._handler)
            self._closing = True
            if self._rest is None:
                self._rest = _CLOSED
            self._lot.unpark_all()

    async def query_until_ready(self, sql: str, timeout: float = 5.0) -> str:
        """Run a housekeeping statement; returns its last command tag. Raises BackendError on failure.

        Before the pump runs (start-up) it reads the socket itself; after, it takes the pump's bytes.
        """
        if self.dead:
            raise BackendError("the database server closed the connection")
        house = _Housekeeping(self)
        self.sink = house
        try:
            await self.send(m.query(sql))
            with trio.fail_after(timeout):
                await house.done.wait()
        finally:
            self.sink = None
        if house.closed:
            raise BackendError("the database server closed the connection")
        error = house.error
        if error is not None:
            raise BackendError(f"{error.get('C', '')} {error.get('M', '')}".strip(), error.get("C", CONNECTION_FAILURE))
        if house.tag in ("DISCARD ALL", "DEALLOCATE ALL"):
            self.state.prepared.clear()
        return house.tag


class _Housekeeping:
    """The sink of one housekeeping statement: its tag, error and parameter reports, until ReadyForQuery."""

    __slots__ = ("conn", "done", "tag", "error", "closed")

    def __init__(self, conn: BackendConn) -> None:
        self.conn = conn
        self.done = trio.Event()
        self.tag = ""
        self.error: dict[str, str] | None = None
        self.closed = False

    async def backend_data(self, data: memoryview | bytes) -> None:
        self.backend_data_now(data)

    def backend_data_now(self, data: memoryview | bytes) -> None:
        if self.done.is_set():
            return
        if not data:
            self.closed = True
            self.done.set()
            return
        reader = self.conn.reader
        try:
            reader.feed(bytes(data))
            self._read(reader)
        except ProtocolViolation:
            self.closed = True
            self.done.set()

    def _read(self, reader: MessageReader) -> None:
        while (msg := reader.next()) is not None:
            t, s, e = msg
            if t == m.READY_FOR_QUERY:
                self.done.set()
                return
            if t == m.COMMAND_COMPLETE:
                self.tag = m.command_tag(reader.payload(s, e))
            elif t == m.PARAMETER_STATUS:
                k, v = m.parse_parameter_status(reader.payload(s, e))
                self.conn.params[k] = v
            elif t == m.ERROR_RESPONSE:
                self.error = m.parse_error_fields(reader.payload(s, e))


def _tls_context(sslmode: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if sslmode in ("prefer", "require", "allow"):
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif sslmode == "verify-ca":
        ctx.check_hostname = False
    return ctx


async def _receive_exactly(stream: trio.abc.Stream, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            raise BackendError("the database server closed the connection during start-up")
        buf += chunk
    return buf


async def _open_socket(target: BackendTarget) -> tuple[trio.SocketStream, socket.socket]:
    if target.host.startswith("/"):
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.setblocking(False)
        tsock = trio.socket.from_stdlib_socket(raw)
        await tsock.connect(f"{target.host}/.s.PGSQL.{target.port}")
        return trio.SocketStream(tsock), raw
    infos = await trio.socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    last: OSError | None = None
    for family, type_, proto, _, addr in infos:
        raw = socket.socket(family, type_, proto)
        raw.setblocking(False)
        tsock = trio.socket.from_stdlib_socket(raw)
        try:
            await tsock.connect(addr)
        except OSError as exc:
            tsock.close()
            last = exc
            continue
        return trio.SocketStream(tsock), raw  # SocketStream turns TCP_NODELAY on
    raise last or OSError(errno.EHOSTUNREACH, "no address")


async def connect(target: BackendTarget, *, timeout: float, extra_params: dict[str, str] | None = None) -> BackendConn:
    """Open and authenticate a backend connection, or raise BackendError with a shareable reason."""
    try:
        with trio.fail_after(timeout):
            return await _connect(target, extra_params or {})
    except trio.TooSlowError:
        raise BackendError(f"timed out after {timeout:g} s connecting to the database server") from None
    except OSError as exc:
        raise BackendError(_os_reason(exc)) from None
    except (ProtocolViolation, ScramError, ssl.SSLError, trio.BrokenResourceError) as exc:
        raise BackendError(f"the database server connection failed ({type(exc).__name__})") from None


async def _connect(target: BackendTarget, extra: dict[str, str]) -> BackendConn:
    stream, raw = await _open_socket(target)
    out: trio.abc.Stream = stream
    tls = False
    try:
        if target.sslmode not in ("disable", "allow") and not target.host.startswith("/"):
            await stream.send_all(m.ssl_request())
            answer = await _receive_exactly(stream, 1)
            if answer == b"S":
                out = trio.SSLStream(stream, _tls_context(target.sslmode), server_hostname=target.host)
                await out.do_handshake()
                tls = True
            elif answer == b"N":
                if target.sslmode in ("require", "verify-ca", "verify-full"):
                    raise BackendError("the database server does not support TLS, and the DSN requires it")
            else:
                raise BackendError("the database server answered the TLS request wrongly")
        conn = BackendConn(out, raw, tls, target)
        params = {"user": target.user, "database": target.dbname, **extra}
        if target.options:
            params["options"] = target.options
        await conn.send(m.startup_message(params))
        await _authenticate(conn)
        return conn
    except BaseException:
        await trio.aclose_forcefully(out)
        raise


async def _authenticate(conn: BackendConn) -> None:
    target = conn.target
    reader = conn.reader
    scram: ScramClient | None = None
    while True:
        msg = reader.next()
        if msg is None:
            await conn.receive_messages()
            continue
        t, s, e = msg
        payload = reader.payload(s, e)
        if t == m.AUTHENTICATION:
            if len(payload) < 4:
                raise ProtocolViolation("short authentication message")
            (code,) = _I32.unpack_from(payload, 0)
            if code == 0:
                continue
            if code == 3:
                if target.password is None:
                    raise BackendError("the database server asks for a password and none is stored", CANNOT_CONNECT_NOW)
                await conn.send(m.password_message(target.password.encode() + b"\x00"))
            elif code == 5:
                if target.password is None:
                    raise BackendError("the database server asks for a password and none is stored", CANNOT_CONNECT_NOW)
                await conn.send(m.password_message(md5_password(target.user, target.password, payload[4:8]) + b"\x00"))
            elif code == 10:
                mechs = payload[4:].split(b"\x00")
                if b"SCRAM-SHA-256" not in mechs:
                    raise BackendError("the database server offers no supported SASL mechanism", CANNOT_CONNECT_NOW)
                if target.password is None:
                    raise BackendError("the database server asks for a password and none is stored", CANNOT_CONNECT_NOW)
                scram = ScramClient(target.password)
                await conn.send(m.sasl_initial_response("SCRAM-SHA-256", scram.client_first()))
            elif code == 11 and scram is not None:
                await conn.send(m.password_message(scram.handle_server_first(payload[4:])))
            elif code == 12 and scram is not None:
                scram.verify_server_final(payload[4:])
            else:
                raise BackendError(f"the database server asks for an unsupported authentication method ({code})",
                                   CANNOT_CONNECT_NOW)
        elif t == m.ERROR_RESPONSE:
            fields = m.parse_error_fields(payload)
            code = fields.get("C", "")
            if code.startswith("28"):
                raise BackendError("the database server rejected the stored credentials", CANNOT_CONNECT_NOW)
            raise BackendError(f"the database server refused the connection: {fields.get('M', '')} ({code})",
                               code or CANNOT_CONNECT_NOW)
        elif t == m.PARAMETER_STATUS:
            k, v = m.parse_parameter_status(payload)
            conn.params[k] = v
        elif t == m.BACKEND_KEY_DATA and len(payload) == 8:
            conn.pid, conn.secret = struct.unpack("!ii", payload)
            conn.state.pid = conn.pid
        elif t == m.READY_FOR_QUERY:
            conn.state.settings.initial = dict(conn.params)
            return
        elif t == m.NOTICE_RESPONSE:  # during start-up
            continue
        elif t == m.NEGOTIATE_PROTOCOL_VERSION:  # we ask for nothing optional
            continue
        else:
            raise ProtocolViolation(f"unexpected message {chr(t)!r} during backend start-up")


async def send_cancel(target: BackendTarget, pid: int, secret: int, timeout: float = 5.0) -> None:
    """Best-effort CancelRequest to the server running a query; errors are swallowed by design."""
    with trio.move_on_after(timeout):
        try:
            stream, _raw = await _open_socket(target)
            async with stream:
                await stream.send_all(m.cancel_request(pid, secret))
                # The server closes the connection when it has handled the request.
                await stream.receive_some(1)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
