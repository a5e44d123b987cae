"""The parity harness (issue 14): one scripted workload, run with a raw protocol client directly against
PostgreSQL and through `o7s serve` in session and in transaction mode; what the client receives must be the
same, message by message (type and payload), or the test fails with a readable diff.

The workload covers the simple and the extended protocol (named and unnamed statements, Describe, binary
parameters and results, portals with row limits, pipelines with several Syncs), common types with NULLs,
every byte value in bytea, COPY in and out in text and binary (simple and extended), errors in the middle
of transactions, multi-statement queries and pipelines, NOTICEs and WARNINGs between data rows, empty
queries, ParameterStatus after SET, and rows of a few MB.

What is masked, because it differs inherently (and nothing else):
- BackendKeyData: the process id and secret are a different backend's, or O7s's own.
- NotificationResponse: the sender's process id is rendered `self` when it is the one the client was given
  in BackendKeyData and `other` when not (the pid itself differs from run to run).
- The workload reads no clock and no process id, so no value in a row needs masking.
O7s sets the org's tier settings (`statement_timeout`, `work_mem`) as start-up parameters of every backend
connection, by design; the direct run is given the same ones, read from the control plane.
ErrorResponse and NoticeResponse are compared with every field, file/line/routine (F, L, R) included: O7s
relays the server's own message, and the server is the same binary in every run, so those fields agree;
an error O7s made up itself would differ and is flagged. Startup ParameterStatus messages are compared as
a set (their order differs: in transaction mode O7s reports the pool's known server parameters).
"""

from __future__ import annotations

import difflib
import hashlib
import struct
import threading
from dataclasses import dataclass

import psycopg
import pytest
from conftest import Org, Proxy, direct_login, proxy_login, raw_session

pytestmark = pytest.mark.timeout(240)

MB = 1 << 20
LARGE = 3 * MB                    # "a few MB": one text value, one bytea parameter and result
SHOW_BYTES = 120                  # payloads longer than this are rendered by length and digest
ALL_BYTES = bytes(range(256))
APP = "o7s_parity"

# --------------------------------------------------------------------------------- frontend messages


def _msg(t: bytes, payload: bytes = b"") -> bytes:
    return t + struct.pack("!i", 4 + len(payload)) + payload


def _c(s: str | bytes) -> bytes:
    return (s.encode() if isinstance(s, str) else s) + b"\0"


def Q(sql: str) -> bytes:
    return _msg(b"Q", _c(sql))


def P(sql: str, name: str = "", types: tuple[int, ...] = ()) -> bytes:
    return _msg(b"P", _c(name) + _c(sql) + struct.pack("!h", len(types)) + b"".join(struct.pack("!i", t) for t in types))


def B(params: tuple[bytes | None, ...] = (), *, stmt: str = "", portal: str = "", param_formats: tuple[int, ...] = (),
      result_formats: tuple[int, ...] = ()) -> bytes:
    out = _c(portal) + _c(stmt) + struct.pack("!h", len(param_formats)) + b"".join(struct.pack("!h", f) for f in param_formats)
    out += struct.pack("!h", len(params))
    for p in params:
        out += struct.pack("!i", -1) if p is None else struct.pack("!i", len(p)) + p
    out += struct.pack("!h", len(result_formats)) + b"".join(struct.pack("!h", f) for f in result_formats)
    return _msg(b"B", out)


def E(portal: str = "", max_rows: int = 0) -> bytes:
    return _msg(b"E", _c(portal) + struct.pack("!i", max_rows))


def D(kind: str, name: str = "") -> bytes:
    return _msg(b"D", kind.encode() + _c(name))


def C(kind: str, name: str = "") -> bytes:
    return _msg(b"C", kind.encode() + _c(name))


def S() -> bytes:
    return _msg(b"S")


def H() -> bytes:
    return _msg(b"H")


def copy_data(data: bytes) -> bytes:
    return _msg(b"d", data)


def copy_done() -> bytes:
    return _msg(b"c")


def copy_fail(reason: str) -> bytes:
    return _msg(b"f", _c(reason))


def binary_copy(rows: list[tuple[bytes | None, ...]]) -> bytes:
    """A COPY ... (FORMAT binary) stream: signature, flags, header extension, tuples, trailer."""
    out = b"PGCOPY\n\xff\r\n\0" + struct.pack("!ii", 0, 0)
    for row in rows:
        out += struct.pack("!h", len(row))
        for v in row:
            out += struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v
    return out + struct.pack("!h", -1)


def i4(v: int) -> bytes:
    return struct.pack("!i", v)


# ----------------------------------------------------------------------------------------- workload

SCHEMA = [
    "DROP TABLE IF EXISTS parity_items, parity_blobs",
    """CREATE TABLE parity_items (id int PRIMARY KEY, name text, qty int2, big int8, price numeric(12,3),
         ratio float8, ok bool, day date, at timestamp, atz timestamptz, span interval, uid uuid,
         doc jsonb, tags text[], addr inet)""",
    "CREATE TABLE parity_blobs (id int PRIMARY KEY, data bytea)",
    """CREATE OR REPLACE FUNCTION parity_noisy(i int) RETURNS int LANGUAGE plpgsql AS $$
       BEGIN
         IF i % 2 = 0 THEN RAISE NOTICE 'row % is even', i; ELSE RAISE WARNING 'row % is odd', i USING HINT = 'odd'; END IF;
         RETURN i * 10;
       END $$""",
]
RESET = "TRUNCATE parity_items, parity_blobs"

TYPES_ROW = ("SELECT 1::int2 AS a, 2::int4, 3000000000::int8, 12.5::numeric, 'NaN'::float8, '-Infinity'::float4, "
             "true, 'é ✓ \U0001F600'::text, 'x'::varchar(3), '2024-02-29'::date, '23:59:59.5'::time, "
             "'2024-01-01 12:00:00.123456'::timestamp, '2024-01-01 12:00:00+02'::timestamptz, "
             "'1 year 2 mons 3 days 04:05:06'::interval, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid, "
             "'{\"k\": [1, null]}'::json, '{\"k\": [1, null]}'::jsonb, ARRAY[1, NULL, 3], ARRAY['a', NULL]::text[], "
             "'10.0.0.1/8'::inet, 'a'::char, B'1011'::bit(4), '\\x00ff'::bytea, NULL::int, NULL::text, "
             "NULL::bytea, NULL::jsonb, NULL::int[]")
ITEM_COPY_TEXT = (
    "1\twidget\t3\t9000000000\t12.500\t0.25\tt\t2024-01-02\t2024-01-02 03:04:05\t2024-01-02 03:04:05+00\t1 day\t"
    "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11\t{\"a\": 1}\t{x,\"y z\",NULL}\t192.168.0.1\n"
    "2\t\\N\t\\N\t\\N\t\\N\t\\N\t\\N\t\\N\t\\N\t\\N\t\\N\t\\N\t\\N\t\\N\t\\N\n"
    "3\ttab\\there, newline\\nthere, back\\\\slash\t-1\t-1\t-0.001\tNaN\tf\t1999-12-31\t1999-12-31 23:59:59\t"
    "1999-12-31 23:59:59-05\t-1 mon\t00000000-0000-0000-0000-000000000000\t[]\t{}\t::1\n"
).encode()


@dataclass
class Step:
    name: str
    send: list[bytes]
    ready: int = 1   # ReadyForQuery messages that end the step


def workload() -> list[Step]:
    big_text = f"SELECT repeat('x', {LARGE}) AS big, length(repeat('y', {LARGE}))"
    big_blob = bytes(range(256)) * (LARGE // 256)
    steps = [
        Step("reset", [Q(RESET)]),
        # --- simple protocol
        Step("types, text results", [Q(TYPES_ROW)]),
        Step("empty query", [Q("")]),
        Step("only a semicolon", [Q(";")]),
        Step("multi-statement", [Q("SELECT 1 AS one; SELECT 'two', NULL; VALUES (3), (4)")]),
        Step("multi-statement with an error in the middle", [Q("SELECT 1; SELECT 1/0; SELECT 3")]),
        Step("notice of a DDL", [Q("DROP TABLE IF EXISTS parity_never_there")]),
        Step("notices and warnings between rows", [Q("SELECT i, parity_noisy(i) FROM generate_series(1, 5) i")]),
        Step("notice from DO", [Q("DO $$ BEGIN RAISE NOTICE 'hello %', 42 USING DETAIL = 'the detail'; END $$")]),
        Step("syntax error", [Q("SELEC 1")]),
        Step("undefined table", [Q("SELECT * FROM parity_nowhere")]),
        Step("unique violation fields", [Q("INSERT INTO parity_blobs VALUES (1, NULL), (1, NULL)")]),
        Step("transaction with an error in the middle",
             [Q("BEGIN"), Q("INSERT INTO parity_blobs VALUES (10, 'abc')"), Q("SELECT 1/0"),
              Q("SELECT 1"), Q("ROLLBACK")], ready=5),
        Step("savepoint rollback",
             [Q("BEGIN; INSERT INTO parity_blobs VALUES (11, 'a'); SAVEPOINT s1"),
              Q("INSERT INTO parity_blobs VALUES (11, 'dup')"), Q("ROLLBACK TO SAVEPOINT s1"),
              Q("INSERT INTO parity_blobs VALUES (12, 'b'); COMMIT"), Q("SELECT id FROM parity_blobs ORDER BY id")],
             ready=5),
        Step("commit of a failed transaction", [Q("BEGIN"), Q("SELECT x"), Q("COMMIT")], ready=3),
        Step("SET reports ParameterStatus",
             [Q("SET application_name = 'parity two'"), Q("SET TimeZone = 'Asia/Kolkata'"),
              Q("SELECT '2024-06-01 00:00:00+00'::timestamptz"), Q("SET DateStyle = 'SQL, DMY'"),
              Q("SELECT '2024-06-01'::date"), Q("RESET DateStyle"), Q("RESET TimeZone"),
              Q("SET application_name = '" + APP + "'")], ready=8),
        Step("SET in a rolled-back transaction", [Q("BEGIN; SET LOCAL work_mem = '8MB'; SHOW work_mem"),
                                                  Q("ROLLBACK"), Q("SHOW work_mem")], ready=3),
        # --- COPY, simple protocol
        Step("copy in, text", [Q("COPY parity_items FROM STDIN"), copy_data(ITEM_COPY_TEXT[:40]),
                               copy_data(ITEM_COPY_TEXT[40:]), copy_done()]),
        Step("copy out, text", [Q("COPY (SELECT * FROM parity_items ORDER BY id) TO STDOUT")]),
        Step("copy out, csv with header", [Q("COPY parity_items (id, name, tags) TO STDOUT (FORMAT csv, HEADER)")]),
        Step("copy in, binary",
             [Q("COPY parity_blobs FROM STDIN (FORMAT binary)"),
              copy_data(binary_copy([(i4(100), ALL_BYTES), (i4(101), None), (i4(102), b""),
                                     (i4(103), big_blob)]))]
             + [copy_done()]),
        Step("copy out, binary", [Q("COPY (SELECT id, data FROM parity_blobs WHERE id >= 100 ORDER BY id) "
                                    "TO STDOUT (FORMAT binary)")]),
        Step("copy in, bad row", [Q("COPY parity_blobs FROM STDIN"), copy_data(b"200\t\\\\x00\nnot-a-number\t\\N\n"),
                                  copy_done()]),
        Step("copy in, client fails it", [Q("COPY parity_blobs FROM STDIN"), copy_data(b"201\t\\N\n"),
                                          copy_fail("the client changed its mind")]),
        Step("copy in a transaction, then an error", [Q("BEGIN"), Q("COPY parity_blobs FROM STDIN"),
                                                       copy_data(b"202\t\\N\n"), copy_done(), Q("SELECT 1/0"),
                                                       Q("ROLLBACK")], ready=4),
        Step("copy to stdout from a bad query", [Q("COPY (SELECT 1/0) TO STDOUT")]),
        # --- extended protocol
        Step("unnamed, text and binary results",
             [P(TYPES_ROW), B(), D("P"), E(), B(result_formats=(1,)), D("P"), E(), S()]),
        Step("parameters: NULLs, text and binary",
             [P("SELECT $1::int4, $2::text, $3::bytea, $4::int8, $5::bool", types=(23, 25, 17, 20, 16)),
              D("S"),
              B((i4(7), "zażółć".encode(), ALL_BYTES, None, b"\x01"), param_formats=(1, 0, 1, 1, 1)), E(),
              B((None, None, None, None, None)), E(),
              B((b"8", b"t", b"\\x00ff", b"9", b"f"), result_formats=(1,)), E(), S()]),
        Step("named statement, described, portal with a row limit",
             [P("SELECT g, repeat('r', g) FROM generate_series(1, 7) g WHERE g <= $1", "parity_s1", (23,)),
              D("S", "parity_s1"), S(),
              B((i4(7),), stmt="parity_s1", portal="parity_p1", param_formats=(1,)), D("P", "parity_p1"),
              E("parity_p1", 3), E("parity_p1", 3), E("parity_p1", 3), C("P", "parity_p1"), S(),
              B((b"2",), stmt="parity_s1"), E(), C("S", "parity_s1"), S()], ready=3),
        Step("a closed statement is gone", [B((b"2",), stmt="parity_s1"), E(), S()]),
        Step("named statement used across transactions",
             [P("SELECT $1::text || '!'", "parity_s2"), S(), Q("BEGIN"),
              B((b"a",), stmt="parity_s2"), E(), S(), Q("COMMIT"), B((b"b",), stmt="parity_s2"), E(), S(),
              Q("DEALLOCATE parity_s2"), B((b"c",), stmt="parity_s2"), E(), S()], ready=7),
        Step("pipeline: error in the first segment, second segment runs",
             [P("INSERT INTO parity_blobs VALUES ($1::int, NULL)"), D("S"), B((b"300",)), E(),
              B((b"300",)), E(), B((b"301",)), E(), S(),
              B((b"302",)), E(), S(),
              Q("SELECT id FROM parity_blobs WHERE id >= 300 ORDER BY id")], ready=3),
        Step("pipeline: several statements, one Sync",
             [P("SELECT 1"), B(), E(), P("SELECT $1::int + 1"), B((b"41",)), E(), P("SELECT 'x' WHERE false"), B(),
              D("P"), E(), P(""), B(), E(), S()]),
        Step("pipeline: error in a transaction block",
             [Q("BEGIN"), P("SELECT 1/$1::int"), B((b"1",)), E(), S(), B((b"0",)), E(), S(), B((b"1",)), E(), S(),
              Q("ROLLBACK")], ready=5),
        Step("Flush returns results before Sync",
             [P("SELECT 'flushed'"), B(), E(), H()], ready=0),
        Step("…and Sync ends the batch", [S()]),
        Step("notices between rows, extended",
             [P("SELECT i, parity_noisy(i) FROM generate_series(1, 4) i"), B(), E(), S()]),
        Step("parse error in a pipeline", [P("SELEC $1"), B(), E(), S(), Q("SELECT 'after'")], ready=2),
        Step("describe of a missing statement", [D("S", "parity_missing"), S()]),
        Step("copy in and out, extended",
             [P("COPY parity_blobs FROM STDIN"), B(), E(), copy_data(b"400\t\\\\x0102\n401\t\\N\n"), copy_done(), S(),
              P("COPY (SELECT * FROM parity_blobs WHERE id >= 400 ORDER BY id) TO STDOUT (FORMAT binary)"),
              B(), E(), S()], ready=2),
        # --- large rows
        Step("large text value", [Q(big_text)]),
        Step("large bytea parameter and result",
             [P("INSERT INTO parity_blobs VALUES (500, $1) RETURNING length(data), md5(data)"),
              B((big_blob,), param_formats=(1,)), E(), S(),
              P("SELECT data FROM parity_blobs WHERE id = 500"), B(result_formats=(1,)), E(), S(),
              Q("SELECT id, data FROM parity_blobs WHERE id = 500")], ready=3),
        # --- notifications to oneself
        Step("listen and notify", [Q("LISTEN parity_ch"), Q("NOTIFY parity_ch, 'payload'"),
                                   Q("SELECT pg_notify('parity_ch', 'second')"), Q("UNLISTEN *")], ready=4),
        # --- and the session still works
        Step("final state", [Q("SELECT current_setting('application_name'), current_setting('DateStyle'), "
                               "current_setting('TimeZone'), current_setting('work_mem'), "
                               "(SELECT count(*) FROM parity_items), (SELECT count(*) FROM parity_blobs)")]),
    ]
    return steps


# -------------------------------------------------------------------------------------------- client


def render(t: bytes, body: bytes, own_pid: int | None) -> str:
    """One backend message, readable; masked where the module docstring says."""
    kind = t.decode()
    if kind == "K":
        return "K BackendKeyData <pid and secret masked>"
    if kind == "A":
        pid, rest = struct.unpack("!i", body[:4])[0], body[4:]
        channel, payload, _ = rest.split(b"\0", 2)
        who = "self" if pid == own_pid else "other"
        return f"A Notification from {who}: {channel.decode()!r} {payload.decode()!r}"
    if kind in "EN":
        fields = [(p[:1].decode(), p[1:].decode("utf-8", "replace")) for p in body.split(b"\0") if p]
        return f"{kind} " + " ".join(f"{k}={v!r}" for k, v in fields)
    if kind == "D":
        (n,) = struct.unpack("!h", body[:2])
        pos, vals = 2, []
        for _ in range(n):
            (ln,) = struct.unpack("!i", body[pos:pos + 4])
            pos += 4
            if ln < 0:
                vals.append("NULL")
                continue
            vals.append(_show(body[pos:pos + ln]))
            pos += ln
        return "D " + " | ".join(vals)
    if kind == "T":
        (n,) = struct.unpack("!h", body[:2])
        pos, cols = 2, []
        for _ in range(n):
            end = body.index(b"\0", pos)
            name = body[pos:end].decode()
            table, attnum, typ, size, mod, fmt = struct.unpack("!ihihih", body[end + 1:end + 19])
            pos = end + 19
            cols.append(f"{name}:{typ}/{mod}{'b' if fmt else ''} tbl={table}.{attnum}")
        return "T " + ", ".join(cols)
    if kind in "CS":
        return f"{kind} " + " ".join(repr(p.decode()) for p in body.split(b"\0")[:-1])
    if kind == "Z":
        return f"Z {body.decode()}"
    if kind in "dG H W":
        return f"{kind} {_show(body)}"
    return f"{kind} {body.hex() if len(body) <= SHOW_BYTES else _show(body)}"


def _show(v: bytes) -> str:
    if len(v) <= SHOW_BYTES:
        return repr(v)[1:]
    return f"<{len(v)} bytes, sha256 {hashlib.sha256(v).hexdigest()[:16]}>"


@dataclass
class Transcript:
    startup: list[str]
    steps: list[tuple[str, list[str]]]


def run_workload(host: str, port: int, user: str, password: str, dbname: str, **startup: str) -> Transcript:
    with raw_session(host, port, user, password, dbname, timeout=60, application_name=APP, client_encoding="UTF8",
                     **startup) as (pg, seen):
        own_pid = next(struct.unpack("!i", b[:4])[0] for t, b in seen if t == b"K")
        startup = sorted(render(t, b, own_pid) for t, b in seen if t in (b"S", b"K"))
        startup.append(render(*seen[-1], own_pid))
        steps = []
        for step in workload():
            pg.sendall(b"".join(step.send))
            got: list[str] = []
            ready = 0
            if step.ready == 0:  # Flush: read what it returns, up to the CommandComplete
                while not got or not got[-1].startswith("C "):
                    msg = pg.recv()
                    assert msg is not None, f"{step.name}: connection closed"
                    got.append(render(*msg, own_pid))
            while ready < step.ready:
                msg = pg.recv()
                assert msg is not None, f"{step.name}: connection closed after {got}"
                got.append(render(*msg, own_pid))
                ready += msg[0] == b"Z"
            steps.append((step.name, got))
        return Transcript(startup, steps)


def diff(expected: Transcript, got: Transcript, label: str) -> str:
    """'' when equal; else a unified diff per step that differs."""
    out = []
    if expected.startup != got.startup:
        out.append("\n".join(difflib.unified_diff(expected.startup, got.startup, "direct: startup",
                                                  f"{label}: startup", lineterm="")))
    for (name, want), (_, have) in zip(expected.steps, got.steps):
        if want != have:
            out.append("\n".join(difflib.unified_diff(want, have, f"direct: {name}", f"{label}: {name}",
                                                      lineterm="")))
    return "\n\n".join(out)


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def parity_org(make_org) -> Org:
    org = make_org("parity", "enterprise")
    with psycopg.connect(org.backend_dsn, autocommit=True, connect_timeout=10) as conn:
        for sql in SCHEMA:
            conn.execute(sql)
    return org


@pytest.fixture(scope="module")
def tier_settings(parity_org, migrated) -> dict[str, str]:
    """What O7s sets on every backend connection of the org (its tier's limits)."""
    with psycopg.connect(migrated["O7S_PLATFORM_DSN"], connect_timeout=10) as conn:
        timeout_ms, work_mem = conn.execute("SELECT statement_timeout_ms, work_mem FROM platform.tier_limits "
                                            "WHERE tier = %s", (parity_org.tier,)).fetchone()
    return {"statement_timeout": str(timeout_ms), "work_mem": work_mem}


def _direct(org: Org, settings: dict[str, str]) -> Transcript:
    return run_workload(*direct_login(org), **settings)


@pytest.fixture(scope="module")
def direct(parity_org, tier_settings) -> Transcript:
    return _direct(parity_org, tier_settings)


def test_workload_is_deterministic(parity_org, tier_settings, direct):
    """The harness itself: two direct runs agree (else a difference through O7s would mean nothing)."""
    again = _direct(parity_org, tier_settings)
    assert not diff(direct, again, "direct again"), diff(direct, again, "direct again")
    # and it exercised what it claims to
    kinds = {line[0] for _, lines in direct.steps for line in lines}
    assert set("TDCEINZ123ntsGHdAS") <= kinds, sorted(kinds)


def test_the_diff_flags_a_difference(direct):
    """The comparison itself: one changed byte in one message is reported, with its step."""
    steps = [(name, list(lines)) for name, lines in direct.steps]
    name, lines = steps[1]
    lines[1] = lines[1][:-2] + "?'"
    problems = diff(direct, Transcript(direct.startup, steps), "altered")
    assert name in problems and "\n+" + lines[1] in problems


class Noise:
    """Another client of the org with other settings, in short transactions, while the workload runs: in
    transaction mode the workload's client may move between backends, and its settings must follow it."""

    def __init__(self, proxy: Proxy, org: Org) -> None:
        self.stop = threading.Event()
        self.runs = 0
        self.conn = psycopg.connect(proxy.dsn(org, application_name="noise", options="-c DateStyle=German"),
                                    autocommit=True, connect_timeout=10)
        self.conn.execute("SET TimeZone = 'America/Lima'")
        self.conn.execute("SET work_mem = '1MB'")
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            with self.conn.transaction():
                self.conn.execute("SELECT pg_sleep(0.002)")
            self.runs += 1

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.conn.close()


def test_parity_through_o7s(parity_org, parity_proxy, direct):
    noise = Noise(parity_proxy, parity_org)
    try:
        through = run_workload(*proxy_login(parity_proxy, parity_org))
    finally:
        noise.close()
    assert noise.runs > 0
    problems = diff(direct, through, f"o7s {parity_proxy.mode}")
    assert not problems, f"what the client received differs through O7s ({parity_proxy.mode} mode):\n{problems}"
