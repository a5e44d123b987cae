"""Isolation of orgs sharing one Redis through O7s: no command sequence lets one org read, write, list,
watch or subscribe to another's keys or channels: plain commands, glob patterns, SCAN cursors, keys that
contain the separator or another org's prefix, scripts, Pub/Sub and keyspace notifications."""

from __future__ import annotations

import threading
import time

import pytest
import redis



@pytest.fixture
def two(rp, ra, rb, direct):
    a, b = rp.client(ra), rp.client(rb)
    a.flushdb()
    b.flushdb()
    a.set("secret", "a-only")
    a.set("user:1", "alice")
    a.hset("h:1", "f", "v")
    a.set("o7s:x", "looks-like-a-prefix")
    full = [k for k in direct.keys("*secret")]
    assert len(full) == 1
    a_prefix = full[0][: -len(b"secret")]
    return a, b, a_prefix


def test_plain_commands_see_only_their_own_keys(two) -> None:
    a, b, a_prefix = two
    assert b.get("secret") is None
    assert b.exists("secret", "user:1", "h:1") == 0
    assert b.keys("*") == []
    assert b.dbsize() == 0 and b.randomkey() is None
    # naming A's key by its full backend name reaches only B's own namespace
    assert b.get(a_prefix + b"secret") is None
    b.set(a_prefix + b"secret", "b-write")
    assert a.get("secret") == b"a-only"
    assert b.get(a_prefix + b"secret") == b"b-write"
    assert a.keys(b"*secret") == [b"secret"]  # B's key with A's prefix in its name is not A's
    # B's writes, renames and copies never land in A's namespace
    b.set("secret", "b")
    b.rename("secret", "user:1")
    b.copy("user:1", "h:1")
    assert a.get("secret") == b"a-only" and a.get("user:1") == b"alice" and a.hget("h:1", "f") == b"v"
    b.flushdb()
    assert a.dbsize() == 4  # B's FLUSHDB deleted nothing of A's


@pytest.mark.parametrize("pattern", ["*", "*secret*", "o7s:*", "*:*", "\\*", "[o]7s*", "?*", "*\\", "[", "**"])
def test_glob_patterns_never_reach_outside(two, pattern) -> None:
    a, b, _ = two
    assert b.keys(pattern) == []
    assert list(b.scan_iter(match=pattern)) == []
    assert set(a.keys(pattern)) <= {b"secret", b"user:1", b"h:1", b"o7s:x"}


def test_scan_cursors_of_another_org(two, direct) -> None:
    a, b, _ = two
    for i in range(300):
        direct.set(f"zz-unprefixed-{i}", i)  # keys of nobody, on the shared backend
    cursors = []
    cur = 0
    while True:
        cur, keys = a.scan(cur, count=10)
        cursors.append(cur)
        if cur == 0:
            break
    for c in cursors + [1, 7, 12345, 2**40]:
        _, keys = b.scan(c, count=1000)
        assert keys == []
    seen = set()
    cur = 0
    while True:
        cur, keys = a.scan(cur, count=10)
        seen.update(keys)
        if cur == 0:
            break
    assert seen == {b"secret", b"user:1", b"h:1", b"o7s:x"}


def test_scripts_are_confined_by_the_backend(two) -> None:
    a, b, a_prefix = two
    assert b.eval("return redis.call('SET', KEYS[1], ARGV[1])", 1, "mine", "v") == b"OK"
    assert b.get("mine") == b"v"
    for script in (f"return redis.call('GET', '{a_prefix.decode()}secret')",
                   "return redis.call('KEYS', '*')",
                   "return redis.call('SCAN', '0')",
                   "return redis.call('RANDOMKEY')",
                   "return redis.call('DBSIZE')",
                   "return redis.call('FLUSHALL')",
                   "return redis.call('GET', 'secret')",  # an undeclared key: not prefixed, not allowed
                   f"return redis.call('PUBLISH', '{a_prefix.decode()}news', 'x')",
                   "return redis.call('PUBSUB', 'CHANNELS')"):
        with pytest.raises(redis.ResponseError):
            b.eval(script, 0)
    # a declared key that names A's full backend key is still B's
    assert b.eval("return redis.call('GET', KEYS[1])", 1, a_prefix + b"secret") is None
    assert a.get("secret") == b"a-only"


def test_watch_sees_only_own_keys(two) -> None:
    a, b, _ = two
    with b.pipeline() as p:
        p.watch("secret")
        a.set("secret", "changed-by-a")  # A's key of the same name: not B's
        p.multi()
        p.set("secret", "b")
        assert p.execute() == [True]
    assert a.get("secret") == b"changed-by-a"


def test_pubsub_and_keyspace_events(rp, ra, rb, two, direct) -> None:
    a, b, a_prefix = two
    direct.config_set("notify-keyspace-events", "KA")
    sub_a = sub_b = None
    try:
        sub_b = rp.client(rb).pubsub()
        sub_b.psubscribe("*")
        sub_b.subscribe("__keyspace@0__:secret", a_prefix + b"news")
        for _ in range(3):
            assert sub_b.get_message(timeout=2)["type"] in ("psubscribe", "subscribe")
        refused = rp.client(rb).pubsub()
        refused.subscribe("__keyevent@0__:set")
        with pytest.raises(redis.ResponseError, match="outside your namespace"):
            refused.get_message(timeout=2)
        sub_a = rp.client(ra).pubsub()
        sub_a.subscribe("__keyspace@0__:secret")
        assert sub_a.get_message(timeout=2)["type"] == "subscribe"
        a.set("secret", "again")
        a.publish("news", "for-a")
        got = sub_a.get_message(timeout=2)
        assert got["channel"] == b"__keyspace@0__:secret" and got["data"] == b"set"
        time.sleep(0.3)
        assert sub_b.get_message(timeout=0.5) is None  # nothing of A's reaches B
        # B's own channels only (its keyspace-notification subscriptions are not listed)
        assert b.pubsub_channels() == [a_prefix + b"news"]
        assert b.pubsub_numsub("news") == [(b"news", 0)]
    finally:
        for s in (sub_a, sub_b):
            if s is not None:
                s.close()
        direct.config_set("notify-keyspace-events", "")


def test_blocking_pop_on_same_name_other_org(rp, ra, rb, two) -> None:
    a, b, _ = two
    got = {}

    def pop() -> None:
        got["v"] = rp.client(rb).blpop(["jobs"], timeout=1)

    t = threading.Thread(target=pop)
    t.start()
    time.sleep(0.2)
    a.rpush("jobs", "a-job")
    t.join(5)
    assert got["v"] is None and a.lpop("jobs") == b"a-job"
