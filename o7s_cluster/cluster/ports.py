"""Finding a port that cannot be had before anything is started or printed, with the flag that changes it.

The workers share the public port with SO_REUSEPORT, and Linux lets any socket of the same user that also
sets it join: a second `o7s serve` on a taken port would then start, print a psql line, and get half of
the first one's connections. The probe therefore binds without SO_REUSEPORT (SO_REUSEADDR only, so a
previous run's TIME_WAIT connections are no obstacle), which fails while anything at all holds the port.
"""

from __future__ import annotations

import errno
import socket
from contextlib import ExitStack

from o7s_cluster.config import Settings, parse_listen


class PortError(Exception):
    """An address `o7s serve` needs cannot be bound; the message names it and the flag that changes it."""


def probe(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (never listened on; the caller closes it); OSError when it cannot be had."""
    family, type_, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                       flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except BaseException:
        sock.close()
        raise
    return sock


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def port_error(what: str, host: str, port: int, flag: str, exc: OSError) -> str:
    """`cannot serve on 127.0.0.1:6432: Address already in use (...); choose another with --listen ...`."""
    reason = exc.strerror or str(exc)
    taken = (f" (port {port} is taken, perhaps by another `o7s serve`)"
             if exc.errno == errno.EADDRINUSE else "")
    return f"cannot {what} {_where(host, port)}: {reason}{taken}; choose another with {flag}"


def check_ports(settings: Settings) -> None:
    """Raise PortError if the listen address or the admin address (when one is set) cannot be bound."""
    wanted = [("serve on", settings.listen_host, settings.listen_port, "--listen HOST:PORT")]
    if settings.admin_listen:
        host, port = parse_listen(settings.admin_listen)
        wanted.append(("open the admin port on", host, port, "--admin HOST:PORT"))
    # Held together, each listening for the instant the next one is tried (two bound-only SO_REUSEADDR
    # sockets may share a port), so an admin address that overlaps the listen address fails too.
    with ExitStack() as held:
        for what, host, port, flag in wanted:
            try:
                held.enter_context(probe(host, port)).listen(1)
            except OSError as e:
                raise PortError(port_error(what, host, port, flag, e)) from None
