"""Redis as a tenant database, end to end: a real `o7s serve --redis-listen` in front of a real
redis-server, with redis-py (RESP2 and RESP3) and redis-cli: the command families, transactions,
blocking commands, Pub/Sub, refusals, limits, usage records, and the backend going away."""

from __future__ import annotations

import subprocess
import threading
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry



@pytest.mark.parametrize("protocol", [2, 3])
def test_basic_commands_and_namespace(rp, ra, direct, protocol) -> None:
    c = rp.client(ra, protocol)
    c.flushdb()
    assert c.set("user:42", "alice") is True
    assert c.get("user:42") == b"alice"
    c.hset("h", mapping={"a": "1", "b": "2"})
    assert c.hgetall("h") == {b"a": b"1", b"b": b"2"}
    c.rpush("l", "x", "y")
    assert c.lrange("l", 0, -1) == [b"x", b"y"]
    c.zadd("z", {"m1": 1.5, "m2": 2})
    assert [tuple(x) for x in c.zrange("z", 0, -1, withscores=True)] == [(b"m1", 1.5), (b"m2", 2.0)]
    assert sorted(c.keys("*")) == [b"h", b"l", b"user:42", b"z"]
    assert sorted(c.scan_iter(match="user:*")) == [b"user:42"]
    assert c.dbsize() == 4
    assert c.randomkey() in (b"h", b"l", b"user:42", b"z")
    # on the backend everything is under the org's prefix
    backend_keys = direct.keys("*user:42")
    assert len(backend_keys) == 1 and backend_keys[0].startswith(b"o7s:") and backend_keys[0] != b"user:42"
    assert c.ping() is True
    assert c.client_setname("app") and c.client_getname() in ("app", b"app")
    c.flushdb()
    assert c.dbsize() == 0 and c.keys("*") == []


@pytest.mark.parametrize("protocol", [2, 3])
def test_transactions_watch_and_pipelines(rp, ra, protocol) -> None:
    c = rp.client(ra, protocol)
    c.delete("counter", "k1", "k2")
    pipe = c.pipeline(transaction=True)
    pipe.set("k1", "v1").incr("counter").keys("k*")
    assert pipe.execute() == [True, 1, [b"k1"]]
    # WATCH: a write by another client aborts the transaction
    other = rp.client(ra, protocol)
    with c.pipeline() as p:
        p.watch("counter")
        other.incr("counter")
        p.multi()
        p.incr("counter")
        with pytest.raises(redis.WatchError):
            p.execute()
    assert int(c.get("counter")) == 2
    plain = c.pipeline(transaction=False)
    for i in range(200):
        plain.set(f"p{i}", i)
    plain.get("p199")
    assert plain.execute()[-1] == b"199"
    c.delete(*[f"p{i}" for i in range(200)])


def test_refused_commands_keep_the_connection(rp, ra) -> None:
    c = rp.client(ra)
    for cmd in (("FLUSHALL",), ("CONFIG", "GET", "maxmemory"), ("DEBUG", "SLEEP", "0"), ("SELECT", "1"),
                ("MODULE", "LIST"), ("ACL", "WHOAMI"), ("CLIENT", "KILL", "ID", "1"), ("SCRIPT", "FLUSH"),
                ("FUNCTION", "LIST"), ("NOSUCH",)):
        with pytest.raises(redis.ResponseError, match=f"O7s refuses '{cmd[0]}"):
            c.execute_command(*cmd)
    assert c.ping()


def test_blocking_pop_returns_the_key_without_prefix(rp, ra) -> None:
    c = rp.client(ra)
    c.delete("q")
    got = {}

    def pop() -> None:
        got["v"] = rp.client(ra).blpop(["q"], timeout=5)

    t = threading.Thread(target=pop)
    t.start()
    time.sleep(0.3)
    c.rpush("q", "job")
    t.join(10)
    assert got["v"] == (b"q", b"job")


@pytest.mark.parametrize("protocol", [2, 3])
def test_pubsub(rp, ra, rb, protocol) -> None:
    ch = f"news{protocol}"
    sub = rp.client(ra, protocol).pubsub()
    sub.subscribe(ch)
    sub.psubscribe(ch[:3] + "*")
    msgs = [sub.get_message(timeout=2) for _ in range(2)]
    assert [m["type"] for m in msgs] == ["subscribe", "psubscribe"]
    assert rp.client(rb, protocol).publish(ch, "from-b") == 0  # another org's channel of the same name
    assert rp.client(ra, protocol).publish(ch, "hello") == 2
    got = [sub.get_message(timeout=2) for _ in range(2)]
    assert {(m["type"], m["channel"], m["data"]) for m in got} == {
        ("message", ch.encode(), b"hello"), ("pmessage", ch.encode(), b"hello")}
    assert got[[m["type"] for m in got].index("pmessage")]["pattern"] == ch[:3].encode() + b"*"
    assert sub.get_message(timeout=0.3) is None  # b's message never arrives
    sub.close()


def test_redis_cli(rp, ra) -> None:
    base = ["redis-cli", "-p", str(rp.port), "--user", ra.name, "--pass", ra.password, "--no-auth-warning"]
    assert subprocess.run(base + ["SET", "cli:k", "v"], capture_output=True, text=True).stdout.strip() == "OK"
    assert subprocess.run(base + ["KEYS", "cli:*"], capture_output=True, text=True).stdout.strip() == "cli:k"
    out = subprocess.run(base + ["-3", "HELLO", "3"], capture_output=True, text=True).stdout
    assert "proto" in out


def test_auth(rp, ra) -> None:
    # redis-py retries a failed AUTH on its own (nested retries: 16 logins), which would trip the login
    # breaker at once: one attempt only here
    bad = redis.Redis(host="127.0.0.1", port=rp.port, username=ra.name, password="wrong", retry=Retry(NoBackoff(), 0))
    with pytest.raises(redis.AuthenticationError):
        bad.ping()
    import socket

    with socket.create_connection(("127.0.0.1", rp.port)) as s:  # before AUTH: PING answers, nothing else
        s.sendall(b"PING\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n")
        time.sleep(0.3)
        data = s.recv(1000)
        assert data.startswith(b"+PONG\r\n-NOAUTH Authentication required.\r\n-NOAUTH HELLO must be called")
    # NAME.ORG works like for Postgres
    c = redis.Redis(host="127.0.0.1", port=rp.port, username=f"worker.{ra.name}", password=ra.password)
    assert c.set("named", "1")


def test_protocol_error_closes(rp) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", rp.port)) as s:
        s.sendall(b"*1\r\n$99999999999\r\n")
        data = s.recv(200)
        assert data.startswith(b"-ERR Protocol error")
        assert s.recv(100) == b""
