"""Taken ports found before `o7s serve` starts anything (cluster/ports.py), on real sockets."""

from __future__ import annotations

import socket

import pytest
import trio

from o7s_cluster.cluster.ports import PortError, check_ports
from o7s_cluster.cluster.supervisor import Supervisor
from o7s_cluster.config import Settings


def listener(host: str = "127.0.0.1", reuseport: bool = True) -> socket.socket:
    s = socket.socket()
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as an o7s worker binds its port
    s.bind((host, 0))
    s.listen()
    return s


def test_a_port_held_with_so_reuseport_is_taken():
    with listener() as s:
        port = s.getsockname()[1]
        with pytest.raises(PortError) as e:
            check_ports(Settings(listen_host="127.0.0.1", listen_port=port))
    assert str(e.value) == (f"cannot serve on 127.0.0.1:{port}: Address already in use (port {port} is taken, "
                            "perhaps by another `o7s serve`); choose another with --listen HOST:PORT")
    check_ports(Settings(listen_host="127.0.0.1", listen_port=port))  # free again once closed


def test_an_admin_port_overlapping_the_listen_address_is_refused():
    with listener() as s:
        port = s.getsockname()[1]
    # all interfaces for the admin port, loopback for clients, the same port: one of them could not bind
    with pytest.raises(PortError, match=f"cannot open the admin port on 0.0.0.0:{port}.*--admin HOST:PORT"):
        check_ports(Settings(listen_host="127.0.0.1", listen_port=port, admin_listen=f"0.0.0.0:{port}"))


def test_an_address_not_of_this_machine():
    with pytest.raises(PortError, match=r"cannot serve on 192\.0\.2\.1:6432: .*--listen HOST:PORT"):
        check_ports(Settings(listen_host="192.0.2.1", listen_port=6432))  # TEST-NET-1: never ours


async def test_supervisor_whose_admin_port_was_taken_meanwhile_starts_no_worker(tmp_path):
    """check_ports looked first, but the admin port can be taken before the supervisor binds it: the
    supervisor fails naming it and the flag, and no worker has been started."""
    with listener(reuseport=False) as s:
        port = s.getsockname()[1]
        sup = Supervisor(Settings(listen_port=0, admin_listen=f"127.0.0.1:{port}", workers=1,
                                  run_dir=str(tmp_path / "run")))
        with trio.fail_after(20):
            await sup.run()
    assert sup.failure is not None and f"cannot open the admin port on 127.0.0.1:{port}" in sup.failure
    assert "--admin HOST:PORT" in sup.failure and not sup.handles
