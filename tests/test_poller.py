"""The worker's poller (net.poller) over real socket pairs."""

from __future__ import annotations

import logging
import socket

import pytest
import trio

from o7s_cluster.net.poller import Poller


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


async def test_a_ready_socket_calls_its_handler_until_paused_and_again_after_resume() -> None:
    a, b = _pair()
    got: list[bytes] = []

    def on_readable() -> None:
        got.append(a.recv(100))

    async with trio.open_nursery() as nursery:
        poller = Poller(nursery)
        poller.add(a.fileno(), on_readable)
        b.send(b"one")
        with trio.fail_after(5):
            while not got:
                await trio.sleep(0.01)
        assert got == [b"one"]
        poller.pause(a.fileno())
        b.send(b"two")
        await trio.sleep(0.1)
        assert got == [b"one"]  # paused: the data waits in the socket
        poller.resume(a.fileno())
        with trio.fail_after(5):
            while len(got) < 2:
                await trio.sleep(0.01)
        assert got == [b"one", b"two"]
        poller.remove(a.fileno(), on_readable)
        assert len(poller) == 0
        nursery.cancel_scope.cancel()
    a.close()
    b.close()


async def test_remove_forgets_only_the_handler_that_is_registered() -> None:
    a, b = _pair()
    calls: list[str] = []
    async with trio.open_nursery() as nursery:
        poller = Poller(nursery)
        poller.add(a.fileno(), lambda: calls.append(a.recv(10).decode()))
        poller.remove(a.fileno(), lambda: None)  # another (stale) handler: the fd stays
        assert len(poller) == 1
        b.send(b"x")
        with trio.fail_after(5):
            while not calls:
                await trio.sleep(0.01)
        assert calls == ["x"]
        nursery.cancel_scope.cancel()
    a.close()
    b.close()


async def test_a_failing_handler_is_logged_and_paused_and_the_others_go_on(caplog: pytest.LogCaptureFixture) -> None:
    bad, bad_peer = _pair()
    good, good_peer = _pair()
    got: list[bytes] = []
    failures = 0

    def boom() -> None:
        nonlocal failures
        failures += 1
        raise RuntimeError("bug")

    async with trio.open_nursery() as nursery:
        poller = Poller(nursery)
        poller.add(bad.fileno(), boom)
        poller.add(good.fileno(), lambda: got.append(good.recv(10)))
        with caplog.at_level(logging.ERROR, logger="o7s.poller"):
            bad_peer.send(b"?")
            await trio.sleep(0.1)
            good_peer.send(b"ok")
            with trio.fail_after(5):
                while not got:
                    await trio.sleep(0.01)
        assert failures == 1  # paused after the first failure, though still readable
        assert got == [b"ok"]
        assert "socket handler failed" in caplog.text
        nursery.cancel_scope.cancel()
    for s in (bad, bad_peer, good, good_peer):
        s.close()


async def test_sockets_may_be_forgotten_after_the_poller_has_ended() -> None:
    """A worker's shutdown cancels the poller's task before the sessions' cleanup runs: their
    remove/pause/resume must not fail then (that once crashed a Ray worker's exit)."""
    a, b = _pair()

    def handler() -> None:
        a.recv(10)

    async with trio.open_nursery() as nursery:
        poller = Poller(nursery)
        poller.add(a.fileno(), handler)
        await trio.sleep(0.01)  # the run task is waiting on the set
        nursery.cancel_scope.cancel()
    poller.pause(a.fileno())
    poller.resume(a.fileno())
    poller.remove(a.fileno(), handler)
    assert len(poller) == 0
    with pytest.raises(RuntimeError, match="poller has ended"):
        poller.add(b.fileno(), handler)
    a.close()
    b.close()
