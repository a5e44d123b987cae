"""The sans-IO RESP codec: exact encodings, caps before allocation, and fuzzing (split at every byte
boundary, random bytes: never a crash, never a hang)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.connection import PythonRespSerializer

from o7s_cluster.resp.codec import (
    MAX_DEPTH,
    NeedMore,
    ProtocolError,
    Reply,
    ReplyError,
    RequestParser,
    encode_command,
    encode_reply,
    parse_reply,
    reply_end,
    split_inline,
)

args_st = st.lists(st.binary(max_size=40), min_size=1, max_size=6)


def _drain(p: RequestParser) -> list:
    out = []
    while True:
        c = p.next_command()
        if c is None:
            return out
        out.append(c)
        if isinstance(c, ProtocolError):
            return out


def test_encode_command_matches_redis_py() -> None:
    """Our encoding of a command is byte for byte what redis-py sends."""
    ser = PythonRespSerializer(65536, lambda x: x)
    for args in ([b"SET", b"k", b"v"], [b"GET", b""], [b"MSET"] + [b"x" * 100] * 9):
        assert encode_command(args) == b"".join(ser.pack(*args))


@given(st.lists(args_st, min_size=1, max_size=5))
@settings(max_examples=60)
def test_commands_split_at_every_boundary(commands: list[list[bytes]]) -> None:
    stream = b"".join(encode_command(c) for c in commands)
    for cut in range(len(stream) + 1):
        p = RequestParser()
        p.feed(stream[:cut])
        got = _drain(p)
        p.feed(stream[cut:])
        got += _drain(p)
        assert got == commands
        assert p.buffered == 0


def test_byte_at_a_time() -> None:
    cmds = [[b"SET", b"a\r\nb", b"\x00\xff"], [b"PING"]]
    p = RequestParser()
    got = []
    for b in b"".join(encode_command(c) for c in cmds) + b"get  'x y'\r\n":
        p.feed(bytes([b]))
        got += _drain(p)
    assert got == cmds + [[b"get", b"x y"]]


@given(st.binary(max_size=300))
@settings(max_examples=400)
def test_random_bytes_never_crash(data: bytes) -> None:
    p = RequestParser(max_args=64, max_bulk=1024)
    p.feed(data)
    for c in _drain(p):
        assert isinstance(c, (list, ProtocolError))
        if isinstance(c, list):
            assert len(c) <= 64 and all(len(a) <= 1024 for a in c)


@pytest.mark.parametrize("data, reason", [
    (b"*99999999999999999999\r\n", "invalid multibulk length"),
    (b"*2000\r\n", "invalid multibulk length"),
    (b"*x\r\n", "invalid multibulk length"),
    (b"*1\r\n$5000\r\n", "invalid bulk length"),
    (b"*1\r\n$-3\r\n", "invalid bulk length"),
    (b"*1\r\n:3\r\n", "expected '$', got ':'"),
    (b"*1\r\n$1\r\nab\r\n", "bulk string not terminated by CRLF"),
    (b"*" + b"1" * 60, "invalid multibulk length"),  # a header line that never ends
    (b'set "a\r\n', "unbalanced quotes in request"),
    (b"x" * 5000, "too big inline request"),
])
def test_caps_before_allocation(data: bytes, reason: str) -> None:
    """Each cap is checked on the header, before the body arrives (nothing is waited for or buffered)."""
    p = RequestParser(max_args=1000, max_bulk=4096, max_inline=4096)
    p.feed(data)
    err = p.next_command()
    assert err == ProtocolError(reason)
    assert err.reply() == b"-ERR Protocol error: " + reason.encode() + b"\r\n"
    p.feed(encode_command([b"PING"]))
    assert p.next_command() == err  # broken for good: the shell closes


def test_limits_can_change_after_auth() -> None:
    p = RequestParser(max_args=3, max_bulk=8)
    p.feed(encode_command([b"AUTH", b"o", b"pw"]))
    assert p.next_command() == [b"AUTH", b"o", b"pw"]
    p.set_limits(100, 1000)
    p.feed(encode_command([b"SET", b"k", b"v" * 500]))
    assert p.next_command() == [b"SET", b"k", b"v" * 500]


def test_inline_quoting_like_redis() -> None:
    assert split_inline(b'set k "a\\nb\\x41" \'it\\\'s\'') == [b"set", b"k", b"a\nbA", b"it's"]
    assert split_inline(b"   ") == []
    assert split_inline(b'"a"b') is None
    assert split_inline(b"'a") is None


def test_empty_multibulk_is_skipped() -> None:
    p = RequestParser()
    p.feed(b"*0\r\n*-1\r\n\r\n*1\r\n$4\r\nPING\r\n")
    assert _drain(p) == [[b"PING"]]


# --- replies --------------------------------------------------------------------------------------

_line = st.builds(lambda k, s: Reply(k, s), st.sampled_from("+-"), st.binary(max_size=10).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"")))
_num = st.builds(lambda k, n: Reply(k, str(n).encode()), st.sampled_from(":(,"), st.integers(-10**20, 10**20))
_blob = st.builds(lambda k, b: Reply(k, b), st.sampled_from("$!="), st.binary(max_size=20))
_leaf = st.one_of(_line, _num, _blob, st.just(Reply("_", None)), st.just(Reply("$", None)),
                  st.just(Reply("*", None)), st.builds(lambda b: Reply("#", b), st.sampled_from([b"t", b"f"])))


def _agg(children: st.SearchStrategy) -> st.SearchStrategy:
    lists = st.lists(children, max_size=4)
    return st.one_of(
        st.builds(lambda k, xs: Reply(k, xs), st.sampled_from("*~>"), lists),
        st.builds(lambda xs: Reply("%", xs[: len(xs) // 2 * 2]), lists),
        st.builds(lambda xs, v: Reply("|", xs[: len(xs) // 2 * 2] + [v]), lists, children),
    )


replies = st.recursive(_leaf, _agg, max_leaves=12)


@given(st.lists(replies, min_size=1, max_size=3))
@settings(max_examples=80)
def test_replies_roundtrip_split_at_every_boundary(values: list[Reply]) -> None:
    stream = b"".join(encode_reply(v) for v in values)
    ends = []
    pos = 0
    for v in values:
        got, end = parse_reply(stream, pos)
        assert got == v
        assert reply_end(stream, pos) == end
        ends.append(end)
        pos = end
    assert pos == len(stream)
    for cut in range(len(stream)):
        part = stream[:cut]
        # the first reply is complete exactly when the cut reaches its end
        if cut < ends[0]:
            with pytest.raises(NeedMore):
                parse_reply(part, 0)
            with pytest.raises(NeedMore):
                reply_end(part, 0)
        else:
            assert reply_end(part, 0) == ends[0]


@given(st.binary(max_size=200))
@settings(max_examples=400)
def test_random_reply_bytes_never_crash(data: bytes) -> None:
    for fn in (parse_reply, reply_end):
        try:
            fn(data, 0)
        except (NeedMore, ReplyError):
            pass


def test_reply_caps() -> None:
    with pytest.raises(ReplyError):
        reply_end(b"$999999999999\r\n")
    with pytest.raises(ReplyError):
        parse_reply(b"*99999999999\r\n")
    deep = b"*1\r\n" * (MAX_DEPTH + 5) + b":1\r\n"
    for fn in (parse_reply, reply_end):
        with pytest.raises(ReplyError):
            fn(deep)
    with pytest.raises(ReplyError):
        reply_end(b"?x\r\n")


def test_resp3_examples_exact() -> None:
    hello = (b"%2\r\n$6\r\nserver\r\n$5\r\nredis\r\n$5\r\nproto\r\n:3\r\n")
    r, end = parse_reply(hello)
    assert end == len(hello) and encode_reply(r) == hello
    push = b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n"
    r, _ = parse_reply(push)
    assert r.kind == ">" and [x.data for x in r.data] == [b"message", b"ch", b"hi"]
    assert encode_reply(Reply("_", None)) == b"_\r\n"
    assert encode_reply(Reply("*", None)) == b"*-1\r\n"
