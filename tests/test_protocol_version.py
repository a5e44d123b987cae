"""Protocol 3.2 and `_pq_.` options through a real `o7s serve`: NegotiateProtocolVersion, then 3.0, as PostgreSQL.

PostgreSQL (ProcessStartupPacket) accepts any 3.x StartupMessage; when the minor version is newer than its own or
the packet carries protocol options (`_pq_.*`) it does not know, it answers NegotiateProtocolVersion (the newest
minor it speaks, the options it ignored) before authentication and the session goes on in that version.
"""

from __future__ import annotations

import struct

import psycopg
import pytest

from conftest import RawPG, first_error

PROTOCOL_3_2 = (3 << 16) | 2


class RawPG32(RawPG):
    """A raw frontend whose StartupMessage asks for protocol 3.2."""

    version = PROTOCOL_3_2

    def send_startup(self, params: dict[str, str], version: int | None = None) -> None:
        super().send_startup(params, self.version if version is None else version)


def _negotiation(body: bytes) -> tuple[tuple[int, int], list[str]]:
    """NegotiateProtocolVersion: ((major, minor) of the newest version the server speaks, unrecognised options)."""
    version, count = struct.unpack("!ii", body[:8])
    names = body[8:].split(b"\0")[:-1]
    assert len(names) == count
    return (version >> 16, version & 0xFFFF), [n.decode() for n in names]


@pytest.fixture(scope="module")
def org(make_org):
    return make_org("proto32", "pro")


@pytest.mark.parametrize("version, options, expected", [
    (PROTOCOL_3_2, {}, ((3, 0), [])),
    (PROTOCOL_3_2, {"_pq_.test_option": "1", "_pq_.other": "x"}, ((3, 0), ["_pq_.test_option", "_pq_.other"])),
    ((3 << 16) | 0, {"_pq_.test_option": "1"}, ((3, 0), ["_pq_.test_option"])),
    ((3 << 16) | 0xFFFF, {}, ((3, 0), [])),
])
def test_raw_startup_is_negotiated_down_to_3_0(proxy, org, version, options, expected):
    with RawPG32(proxy.host, proxy.port) as raw:
        raw.version = version
        msgs = raw.login(org.name, org.password, org.dbname, **options)
        assert msgs[0][0] == b"v", msgs[:2]
        assert _negotiation(msgs[0][1]) == expected
        assert first_error(msgs) is None and msgs[-1][0] == b"Z"
        assert [t for t, _ in msgs[1:]].count(b"v") == 0
        # BackendKeyData is the 3.0 one (4-byte secret), and the session works.
        keys = [body for t, body in msgs if t == b"K"]
        assert len(keys) == 1 and len(keys[0]) == 8
        rows = raw.simple_query("select 41 + 1")
        assert any(t == b"D" for t, _ in rows) and rows[-1][0] == b"Z"


def test_protocol_3_0_gets_no_negotiation(proxy, org):
    with RawPG(proxy.host, proxy.port) as raw:
        msgs = raw.login(org.name, org.password, org.dbname)
        assert first_error(msgs) is None and b"v" not in [t for t, _ in msgs]


def test_what_postgresql_itself_answers(pg_server, proxy, org):
    """The same packet to PostgreSQL 15 (newest minor 0) and to O7s: the same NegotiateProtocolVersion."""
    got = {}
    for name, (host, port) in {"postgres": (pg_server.host, pg_server.port), "o7s": (proxy.host, proxy.port)}.items():
        with RawPG32(host, port) as raw:
            raw.send_startup({"user": pg_server.user if name == "postgres" else org.name, "database": "postgres",
                              "_pq_.test_option": "on"})
            got[name] = raw.recv()
    with psycopg.connect(f"host={pg_server.host} port={pg_server.port} user={pg_server.user} dbname=postgres") as c:
        newest = (3, 2) if c.info.server_version >= 180000 else (3, 0)
    assert got["postgres"][0] == b"v" and _negotiation(got["postgres"][1]) == (newest, ["_pq_.test_option"])
    if newest == (3, 0):  # a server that speaks what O7s speaks answers byte for byte the same
        assert got["o7s"] == got["postgres"]
    else:
        assert _negotiation(got["o7s"][1]) == ((3, 0), ["_pq_.test_option"])


def test_major_version_other_than_3_is_refused(proxy):
    with RawPG32(proxy.host, proxy.port) as raw:
        raw.version = 4 << 16
        raw.send_startup({"user": "x"})
        err = first_error(raw.recv_until(b"E"))
        assert err is not None and err["C"] == "08P01" and "unsupported frontend protocol 4.0" in err["M"]


@pytest.mark.skipif(psycopg.pq.version() < 180000, reason="libpq 18 has max_protocol_version")
def test_libpq_18_with_max_protocol_version_3_2(proxy, org):
    with psycopg.connect(proxy.dsn(org, max_protocol_version="3.2"), autocommit=True) as conn:
        assert conn.pgconn.full_protocol_version == 30000  # libpq went on in 3.0
        assert conn.execute("select 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError, match="(?i)protocol"):
        psycopg.connect(proxy.dsn(org, min_protocol_version="3.2"))
