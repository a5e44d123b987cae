"""Namespacing, sans-IO: which arguments get the org's prefix, which replies lose it, what is refused
and what is emulated. The key table is checked against a real Redis's own `COMMAND GETKEYS`."""

from __future__ import annotations

import pytest
import redis

from o7s_cluster.resp.codec import Reply, parse_reply
from o7s_cluster.resp.namespace import (
    T_FIRST,
    T_KEYS,
    T_NUMSUB,
    T_SCAN,
    T_XREAD,
    Answer,
    Forward,
    Namespace,
    glob_escape,
)

P = b"o7s:11111111-2222-3333-4444-555555555555:"


def ns() -> Namespace:
    return Namespace(P, db=3)


def fwd(*args: bytes) -> Forward:
    out = ns().rewrite(list(args))
    assert isinstance(out, Forward), out
    return out


def refused(*args: bytes) -> bytes:
    out = ns().rewrite(list(args))
    assert isinstance(out, Answer) and out.refused, out
    return out.reply


# Commands whose keys Redis itself can name (COMMAND GETKEYS), with our rewrite compared position by position.
SAMPLES = [
    [b"GET", b"k"], [b"SET", b"k", b"v", b"EX", b"10"], [b"MSET", b"a", b"1", b"b", b"2"], [b"MGET", b"a", b"b", b"c"],
    [b"DEL", b"a", b"b"], [b"RENAME", b"a", b"b"], [b"BLPOP", b"a", b"b", b"0"], [b"BZPOPMIN", b"z1", b"z2", b"1"],
    [b"EVAL", b"return 1", b"2", b"k1", b"k2", b"arg"], [b"EVALSHA", b"abc", b"1", b"k1", b"x"],
    [b"FCALL", b"f", b"1", b"k1", b"x"], [b"ZUNIONSTORE", b"d", b"2", b"a", b"b", b"WEIGHTS", b"1", b"2"],
    [b"ZINTER", b"2", b"a", b"b"], [b"SINTERCARD", b"2", b"a", b"b", b"LIMIT", b"3"], [b"LMPOP", b"2", b"a", b"b", b"LEFT"],
    [b"BLMPOP", b"0", b"2", b"a", b"b", b"LEFT"], [b"XREAD", b"COUNT", b"2", b"STREAMS", b"s1", b"s2", b"0", b"0"],
    [b"XREADGROUP", b"GROUP", b"STREAMS", b"c", b"BLOCK", b"5", b"STREAMS", b"s1", b">"],
    [b"SORT", b"l", b"BY", b"w_*", b"GET", b"#", b"GET", b"o_*", b"STORE", b"dst"],
    [b"GEORADIUS", b"g", b"1", b"2", b"3", b"km", b"COUNT", b"5", b"STORE", b"dst"],
    [b"BITOP", b"AND", b"dst", b"a", b"b"], [b"LMOVE", b"a", b"b", b"LEFT", b"RIGHT"], [b"OBJECT", b"ENCODING", b"k"],
    [b"XINFO", b"STREAM", b"s"], [b"XGROUP", b"CREATE", b"s", b"g", b"$"], [b"MEMORY", b"USAGE", b"k"],
    [b"WATCH", b"a", b"b"], [b"COPY", b"a", b"b", b"REPLACE"], [b"SMOVE", b"a", b"b", b"m"], [b"HSET", b"h", b"f", b"v"],
    [b"ZRANGESTORE", b"d", b"s", b"0", b"-1"], [b"GEOSEARCHSTORE", b"d", b"s", b"FROMLONLAT", b"1", b"2", b"BYRADIUS",
                                                   b"3", b"km"],
]


def test_key_positions_match_redis(redis_server) -> None:
    """For every sample, the arguments we prefix are exactly the ones Redis calls keys (SORT's BY/GET
    patterns, which Redis does not list, are checked separately)."""
    r = redis.Redis.from_url(redis_server.url)
    for args in SAMPLES:
        want = [w.encode() for w in r.command_getkeys(*args)]
        out = fwd(*args).args
        got = [o[len(P):] for a, o in zip(args, out) if o != a and o != a.upper() and o.startswith(P)]
        if args[0] == b"SORT":
            got = got[:1] + got[-1:]  # Redis names the key and STORE's destination only
        assert sorted(got) == sorted(want), (args, got, want)


def test_sort_patterns_and_streams_group_named_streams() -> None:
    out = fwd(b"SORT", b"l", b"BY", b"w_*->f", b"GET", b"#", b"GET", b"o_*", b"LIMIT", b"0", b"5", b"ALPHA").args
    assert out == [b"SORT", P + b"l", b"BY", P + b"w_*->f", b"GET", b"#", b"GET", P + b"o_*", b"LIMIT", b"0", b"5",
                   b"ALPHA"]
    out = fwd(b"XREADGROUP", b"GROUP", b"STREAMS", b"c", b"STREAMS", b"s", b">").args
    assert out[2] == b"STREAMS" and out[5] == P + b"s" and out[6] == b">"
    assert fwd(b"XREAD", b"BLOCK", b"0", b"STREAMS", b"s", b"$").blocking
    assert not fwd(b"XREAD", b"STREAMS", b"s", b"$").blocking
    assert fwd(b"BLPOP", b"a", b"0").blocking


def test_numkeys_strict() -> None:
    for bad in (b" 1", b"01", b"1_0", b"+1", b"x", b"-1"):
        out = ns().rewrite([b"EVAL", b"return 1", bad, b"k"])
        assert isinstance(out, Answer) and out.reply.startswith(b"-ERR"), bad
    out = ns().rewrite([b"EVAL", b"return 1", b"3", b"k"])
    assert isinstance(out, Answer)
    assert fwd(b"EVAL", b"return 1", b"0", b"notakey").args[3] == b"notakey"


def test_keys_and_scan_patterns() -> None:
    assert glob_escape(b"a*b?[c]\\") == b"a\\*b\\?\\[c\\]\\\\"
    n = Namespace(b"o7s:we*ird[:", 0)
    out = n.rewrite([b"KEYS", b"user:*"])
    assert isinstance(out, Forward) and out.args == [b"KEYS", b"o7s:we\\*ird\\[:user:*"] and out.transform == T_KEYS
    s = fwd(b"SCAN", b"0")
    assert s.args == [b"SCAN", b"0", b"MATCH", P + b"*"] and s.transform == T_SCAN
    s = fwd(b"scan", b"17", b"count", b"5", b"MATCH", b"a?", b"TYPE", b"string")
    assert s.args == [b"SCAN", b"17", b"COUNT", b"5", b"MATCH", P + b"a?", b"TYPE", b"string"]
    assert isinstance(ns().rewrite([b"SCAN", b"0", b"MATCH"]), Answer)


def test_refused_commands_name_themselves() -> None:
    for cmd in ([b"FLUSHALL"], [b"CONFIG", b"GET", b"*"], [b"DEBUG", b"SLEEP", b"0"], [b"MONITOR"], [b"SELECT", b"1"],
                [b"MIGRATE", b"h", b"1", b"k", b"0", b"1"], [b"MODULE", b"LIST"], [b"SHUTDOWN"], [b"ACL", b"LIST"],
                [b"REPLICAOF", b"h", b"1"], [b"SCRIPT", b"FLUSH"], [b"SCRIPT", b"KILL"], [b"FUNCTION", b"LOAD", b"x"],
                [b"FUNCTION", b"FLUSH"], [b"PUBSUB", b"NUMPAT"], [b"SWAPDB", b"0", b"1"], [b"NOSUCHCMD"],
                [b"MEMORY", b"STATS"]):
        reply = refused(*cmd)
        assert reply.startswith(b"-ERR O7s refuses '" + cmd[0].upper()), reply
    assert b"'SCRIPT FLUSH'" in refused(b"script", b"flush")
    assert isinstance(ns().rewrite([b"SCRIPT", b"LOAD", b"return 1"]), Forward)


def test_emulations() -> None:
    f = fwd(b"FLUSHDB")
    assert f.args[0] == b"EVAL" and f.args[2:] == [b"0", P + b"*"] and b"UNLINK" in f.args[1]
    assert fwd(b"flushdb", b"async").args[0] == b"EVAL"
    assert fwd(b"DBSIZE").args[3] == P + b"*"
    r = fwd(b"RANDOMKEY")
    assert r.args[3:] == [P + b"*", b"%d" % len(P)]


def test_replies_lose_the_prefix() -> None:
    n = ns()
    keys = Reply("*", [Reply("$", P + b"a"), Reply("$", P + b"b:c"), Reply("$", b"other:x")])
    assert [x.data for x in n.apply(T_KEYS, keys).data] == [b"a", b"b:c"]  # a foreign name is never shown
    scan = Reply("*", [Reply("$", b"42"), keys])
    out = n.apply(T_SCAN, scan)
    assert out.data[0].data == b"42" and [x.data for x in out.data[1].data] == [b"a", b"b:c"]
    pop = Reply("*", [Reply("$", P + b"q"), Reply("$", b"v")])
    assert [x.data for x in n.apply(T_FIRST, pop).data] == [b"q", b"v"]
    assert n.apply(T_FIRST, Reply("*", None)) == Reply("*", None)
    x3 = Reply("%", [Reply("$", P + b"s"), Reply("*", [])])
    assert n.apply(T_XREAD, x3).data[0].data == b"s"
    x2 = Reply("*", [Reply("*", [Reply("$", P + b"s"), Reply("*", [])])])
    assert n.apply(T_XREAD, x2).data[0].data[0].data == b"s"
    numsub = Reply("*", [Reply("$", P + b"ch"), Reply(":", b"2")])
    assert n.apply(T_NUMSUB, numsub).data[0].data == b"ch"
    assert n.error_text(b"-NOGROUP No such key '" + P + b"s' or consumer group") == b"-NOGROUP No such key 's' or consumer group"


def test_channels_and_keyspace_events() -> None:
    n = ns()
    assert n.rewrite([b"SUBSCRIBE", b"news", b"__keyspace@0__:user:1"]).args == [
        b"SUBSCRIBE", P + b"news", b"__keyspace@3__:" + P + b"user:1"]
    assert n.rewrite([b"PSUBSCRIBE", b"__keyspace@*__:user:*"]).args == [b"PSUBSCRIBE", b"__keyspace@3__:" + P + b"user:*"]
    for bad in (b"__keyevent@0__:del", b"__keyspace@1__:k"):
        assert isinstance(n.rewrite([b"SUBSCRIBE", bad]), Answer)
    # PUBLISH always takes the plain prefix: nobody can fake keyspace events
    assert n.rewrite([b"PUBLISH", b"__keyspace@0__:k", b"x"]).args[1] == P + b"__keyspace@0__:k"
    msg = n.pubsub(Reply(">", [Reply("$", b"message"), Reply("$", b"__keyspace@3__:" + P + b"user:1"), Reply("$", b"set")]))
    assert msg.data[1].data == b"__keyspace@0__:user:1"
    pm = n.pubsub(Reply("*", [Reply("$", b"pmessage"), Reply("$", b"__keyspace@3__:" + P + b"user:*"),
                              Reply("$", b"__keyspace@3__:" + P + b"user:9"), Reply("$", b"del")]))
    assert [x.data for x in pm.data[1:3]] == [b"__keyspace@*__:user:*", b"__keyspace@0__:user:9"]
    assert n.pubsub(Reply("*", [Reply("$", b"message"), Reply("$", b"other-org:ch"), Reply("$", b"x")])) is None
    out = n.rewrite([b"PUBSUB", b"CHANNELS"])
    assert out.args == [b"PUBSUB", b"CHANNELS", P + b"*"]


@pytest.mark.parametrize("raw", [b"*2\r\n$4\r\nnews\r\n:1\r\n"])
def test_apply_passes_other_shapes(raw: bytes) -> None:
    r, _ = parse_reply(raw)
    assert ns().apply(T_FIRST, Reply("-", b"ERR x")) == Reply("-", b"ERR x")
    assert ns().pubsub(r) == r
