"""A leaner psycopg wait function for gevent.

Under gevent's monkey patching psycopg (correctly) stops using its C wait function and falls back
to `wait_poll`, which runs on gevent's emulation of `select.poll`: every wait builds a poll
object, a result object with an Event, one io watcher per fd, and a Timeout for psycopg's 100 ms
wake-up interval. Measured on this kind of machine that costs ~130-200 µs of client CPU per query
against ~55 µs with psycopg's C wait and no gevent. This function waits on one libev io watcher
with a bare Waiter instead (the same cooperative behaviour, far fewer Python objects).

`install()` puts it in `psycopg.waiting.wait`, which `Connection.wait` looks up at each call.
Connecting still goes through `psycopg.waiting.wait_conn` (gevent's selectors), once per user.
"""

from __future__ import annotations

import os

from gevent import Timeout
from gevent.hub import Waiter, get_hub
from psycopg import errors as e
from psycopg import waiting

READY_R, READY_W = int(waiting.Ready.R), int(waiting.Ready.W)
WAIT_R, WAIT_W = int(waiting.Wait.R), int(waiting.Wait.W)
EV_READ, EV_WRITE = 1, 2   # libev / libuv io event bits (the same values as psycopg's)


def wait_gevent(gen, fileno: int, interval: float = 0.0, timeout: float | None = None):
    hub = get_hub()
    io = hub.loop.io
    try:
        s = next(gen)
        while True:
            evmask = (EV_READ if s & WAIT_R else 0) | (EV_WRITE if s & WAIT_W else 0)
            try:
                watcher = io(fileno, evmask)
            except OSError as ex:
                raise e.OperationalError("connection socket closed") from ex
            waiter = Waiter(hub)
            watcher.start(waiter.switch, pass_events=True)
            t = Timeout._start_new_or_dummy(timeout) if timeout is not None else None
            try:
                events = waiter.get()
            except Timeout as ex:
                if ex is not t:
                    raise
                raise e._WaitTimeout("wait timeout expired") from None
            finally:
                watcher.stop()
                watcher.close()
                if t is not None:
                    t.close()
            ready = (READY_R if events & EV_READ else 0) | (READY_W if events & EV_WRITE else 0)
            if not ready:
                try:
                    os.fstat(fileno)
                except OSError as ex:
                    raise e.OperationalError("connection socket closed") from ex
            s = gen.send(ready)
    except StopIteration as ex:
        return ex.value


def install() -> None:
    waiting.wait = wait_gevent
