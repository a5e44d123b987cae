"""The sans-IO framing and messages: exact encodings, caps, and fuzzing (no input crashes or hangs)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from o7s_cluster.pgwire import messages as m
from o7s_cluster.pgwire.errors import ProtocolViolation
from o7s_cluster.pgwire.framing import (
    MAX_STARTUP_PACKET,
    PROTOCOL_3_0,
    CancelRequest,
    GSSENCRequest,
    MessageReader,
    SSLRequest,
    StartupMessage,
    parse_startup,
    startup_length,
)


def test_reader_splits_messages_across_arbitrary_chunks() -> None:
    stream = m.query("select 1") + m.sync() + m.parse(b"s1", b"select $1\x00\x00\x01\x00\x00\x00\x17")
    for cut in range(len(stream) + 1):
        r = MessageReader(1024)
        r.feed(stream[:cut])
        got = []
        while (msg := r.next()) is not None:
            got.append(bytes(r.buf[msg[1]:msg[2]]))
        r.feed(stream[cut:])
        while (msg := r.next()) is not None:
            got.append(bytes(r.buf[msg[1]:msg[2]]))
        assert b"".join(got) == stream
        assert [g[0] for g in got] == [ord("Q"), ord("S"), ord("P")]


def test_reader_refuses_a_length_over_the_cap_before_buffering_it() -> None:
    r = MessageReader(max_size=100)
    r.feed(b"Q" + struct.pack("!i", 101))
    with pytest.raises(ProtocolViolation, match="limit 100"):
        r.next()


@pytest.mark.parametrize("length", [-1, 0, 3])
def test_reader_refuses_impossible_lengths(length: int) -> None:
    r = MessageReader(100)
    r.feed(b"Q" + struct.pack("!i", length))
    with pytest.raises(ProtocolViolation):
        r.next()


def test_startup_message_round_trip() -> None:
    pkt = m.startup_message({"user": "alice.acme", "database": "db", "application_name": "x"})
    parsed = parse_startup(pkt)
    assert isinstance(parsed, StartupMessage)
    assert parsed.params == {"user": "alice.acme", "database": "db", "application_name": "x"}


def _startup(version: int, body: bytes) -> bytes:
    return struct.pack("!ii", 8 + len(body), version) + body


def test_protocol_3_0_needs_no_negotiation() -> None:
    parsed = parse_startup(m.startup_message({"user": "u"}))
    assert isinstance(parsed, StartupMessage)
    assert (parsed.minor, parsed.protocol_options, parsed.needs_negotiation) == (0, {}, False)


@pytest.mark.parametrize("minor", [1, 2, 0xFFFF])
def test_a_newer_minor_version_is_parsed_for_negotiation(minor: int) -> None:
    parsed = parse_startup(_startup((3 << 16) | minor, b"user\x00u\x00database\x00d\x00\x00"))
    assert isinstance(parsed, StartupMessage)
    assert parsed.minor == minor and parsed.needs_negotiation
    assert parsed.params == {"user": "u", "database": "d"} and parsed.protocol_options == {}


def test_protocol_options_are_not_settings() -> None:
    body = b"user\x00u\x00_pq_.compression\x00on\x00application_name\x00a\x00_pq_.x\x00\x00\x00"
    parsed = parse_startup(_startup(PROTOCOL_3_0, body))
    assert isinstance(parsed, StartupMessage)
    assert parsed.params == {"user": "u", "application_name": "a"}
    assert parsed.protocol_options == {"_pq_.compression": "on", "_pq_.x": ""}
    assert parsed.minor == 0 and parsed.needs_negotiation


def test_negotiate_protocol_version_encoding() -> None:
    # PostgreSQL's SendNegotiateProtocolVersion: 'v', length, PG_PROTOCOL_LATEST (the whole version code),
    # the number of unrecognised options, then each name NUL-terminated.
    assert m.negotiate_protocol_version(PROTOCOL_3_0, []) == b"v" + struct.pack("!iii", 12, PROTOCOL_3_0, 0)
    raw = m.negotiate_protocol_version(PROTOCOL_3_0, ["_pq_.a", "_pq_.bc"])
    assert raw == b"v" + struct.pack("!iii", 4 + 8 + 7 + 8, PROTOCOL_3_0, 2) + b"_pq_.a\x00_pq_.bc\x00"


def test_special_startup_packets() -> None:
    assert isinstance(parse_startup(m.ssl_request()), SSLRequest)
    assert isinstance(parse_startup(struct.pack("!ii", 8, 80877104)), GSSENCRequest)
    c = parse_startup(m.cancel_request(1234, -5))
    assert isinstance(c, CancelRequest) and (c.pid, c.secret) == (1234, -5)


@pytest.mark.parametrize("packet, match", [
    (struct.pack("!ii", 8, 0x00020000), "unsupported frontend protocol 2.0"),
    (struct.pack("!ii", 8, 0x00040002), "unsupported frontend protocol 4.2"),
    (struct.pack("!ii", 8, -0x10000 + 5), "unsupported frontend protocol 65535.5"),
    (struct.pack("!ii", 12, 196608) + b"user", "NUL"),
    (struct.pack("!ii", 15, 196608) + b"user\x00\x00\x00", "user name"),
    (struct.pack("!ii", 15, 196608) + b"a\x00b\x00c\x00\x00", "without a value"),
    (struct.pack("!iiii", 12, 80877102, 1, 2)[:12], "cancel"),
])
def test_malformed_startup_packets(packet: bytes, match: str) -> None:
    with pytest.raises(ProtocolViolation, match=match):
        parse_startup(packet)


def test_startup_length_is_capped() -> None:
    assert startup_length(struct.pack("!i", MAX_STARTUP_PACKET)) == MAX_STARTUP_PACKET
    with pytest.raises(ProtocolViolation):
        startup_length(struct.pack("!i", MAX_STARTUP_PACKET + 1))
    with pytest.raises(ProtocolViolation):
        startup_length(struct.pack("!i", 7))


def test_error_response_fields_round_trip() -> None:
    raw = m.error_response("FATAL", "53300", "too many", hint="close some", detail="d")
    assert raw[0:1] == b"E"
    fields = m.parse_error_fields(raw[5:])
    assert fields == {"S": "FATAL", "V": "FATAL", "C": "53300", "M": "too many", "D": "d", "H": "close some"}


def test_parse_and_bind_splitting() -> None:
    payload = b"stmt\x00select $1\x00\x00\x01\x00\x00\x00\x17"
    name, rest = m.split_parse(payload)
    assert name == b"stmt" and rest == b"select $1\x00\x00\x01\x00\x00\x00\x17"
    with pytest.raises(ProtocolViolation):
        m.split_parse(b"stmt\x00select 1\x00\x00\x05")
    portal, stmt, pos = m.split_bind(b"\x00stmt\x00\x00\x00\x00\x00\x00\x00")
    assert (portal, stmt, pos) == (b"", b"stmt", 6)


@pytest.mark.parametrize("tag, rows", [("SELECT 3", 3), ("INSERT 0 5", 5), ("COPY 10", 10), ("BEGIN", 0),
                                       ("UPDATE 0", 0)])
def test_rows_from_tag(tag: str, rows: int) -> None:
    assert m.rows_from_tag(tag) == rows


@given(st.binary(max_size=300), st.integers(min_value=1, max_value=64))
def test_fuzz_reader_only_raises_protocol_violation(data: bytes, chunk: int) -> None:
    r = MessageReader(max_size=256)
    consumed = 0
    try:
        for i in range(0, len(data), chunk):
            r.feed(data[i:i + chunk])
            while (msg := r.next()) is not None:
                t, s, e = msg
                assert 5 <= e - s <= 257 and r.buf[s] == t
                consumed += e - s
    except ProtocolViolation:
        return
    assert consumed + r.pending() == len(data)


@given(st.binary(max_size=200))
def test_fuzz_startup_parser(data: bytes) -> None:
    packet = struct.pack("!i", len(data) + 4) + data
    try:
        parse_startup(packet)
    except ProtocolViolation:
        pass


@given(st.binary(max_size=200))
def test_fuzz_message_parsers(data: bytes) -> None:
    for fn in (m.split_parse, m.split_bind, m.split_describe_close, m.parse_error_fields, m.parse_parameter_status):
        try:
            fn(data)
        except ProtocolViolation:
            pass


@given(st.dictionaries(st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), min_size=1,
                               max_size=20),
                       st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=40),
                       max_size=8))
def test_fuzz_startup_round_trip(params: dict[str, str]) -> None:
    params = {**{k: v for k, v in params.items() if not k.startswith("_pq_.")}, "user": "u"}
    pkt = m.startup_message(params)
    if len(pkt) > MAX_STARTUP_PACKET:
        return
    parsed = parse_startup(pkt)
    assert isinstance(parsed, StartupMessage) and parsed.params == params
