"""The sans-IO session core, driven directly with bytes (no sockets, no trio), as h11 tests its Connection."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from o7s_cluster.pgwire import messages as m
from o7s_cluster.pgwire.errors import ClientError, ProtocolViolation
from o7s_cluster.proxy.backend import BackendState
from o7s_cluster.proxy.readback import STATE_ROW, may_change_state
from o7s_cluster.proxy.relay import KEEP, RELEASE
from o7s_cluster.proxy.session import NEED_BACKEND, NEED_TOKEN, PROCEED, STREAM_AT, TERMINATE, SessionCore
from o7s_cluster.proxy.statements import PoolStatements, statement_key


class Counters:
    def __init__(self) -> None:
        self.bytes_in = self.bytes_out = self.throttled = self.refused = self.errors = 0
        self.queries: list[tuple[int, bool]] = []

    def query_done(self, seconds: float, rows: int, ok: bool) -> None:
        assert seconds >= 0
        self.queries.append((rows, ok))


def msg(t: bytes, payload: bytes = b"") -> bytes:
    return t + struct.pack("!i", len(payload) + 4) + payload


def query(sql: str) -> bytes:
    return msg(b"Q", sql.encode() + b"\0")


def parse(name: bytes, sql: str) -> bytes:
    return msg(b"P", name + b"\0" + sql.encode() + b"\0" + b"\0\0")


def bind(stmt: bytes, portal: bytes = b"") -> bytes:
    return msg(b"B", portal + b"\0" + stmt + b"\0" + b"\0\0" + b"\0\0" + b"\0\0")


def execute(portal: bytes = b"") -> bytes:
    return msg(b"E", portal + b"\0" + b"\0\0\0\0")


SYNC = msg(b"S")
PARSE_DONE, BIND_DONE, CLOSE_DONE = b"1\0\0\0\4", b"2\0\0\0\4", b"3\0\0\0\4"


def ready(status: bytes = b"I") -> bytes:
    return msg(b"Z", status)


def complete(tag: str) -> bytes:
    return msg(b"C", tag.encode() + b"\0")


def row(*values: str | None) -> bytes:
    body = struct.pack("!h", len(values))
    for v in values:
        body += struct.pack("!i", -1) if v is None else struct.pack("!i", len(v.encode())) + v.encode()
    return msg(b"D", body)


def error(code: str = "42P01", severity: str = "ERROR") -> bytes:
    return m.error_response(severity, code, "boom")


ROWDESC = msg(b"T", struct.pack("!h", 1) + b"x\0" + struct.pack("!ihihih", 0, 0, 23, 4, -1, 0))


def messages(data: bytes | bytearray) -> list[bytes]:
    """Split a byte stream into its message types (for readable assertions)."""
    out, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack_from("!i", data, pos + 1)
        out.append(bytes(data[pos:pos + 1]))
        pos += 1 + n
    return out


def core(transaction_mode: bool = True, tokens: bool = True, pool: PoolStatements | None = None) -> SessionCore:
    return SessionCore(transaction_mode=transaction_mode, counters=Counters(), pool_statements=pool or PoolStatements(),
                       client_params={"client_encoding": "UTF8"}, take_token=lambda: tokens)


def attach(c: SessionCore, data: bytes, backend: BackendState | None = None) -> BackendState:
    """Feed client bytes that need a backend, give one, and check everything went through."""
    assert c.feed_client(data, 1.0) == NEED_BACKEND
    backend = backend or BackendState()
    backend.settings.reported["client_encoding"] = "UTF8"
    c.attached(backend)
    assert c.resume(1.0) == PROCEED
    return backend


def backend_says(c: SessionCore, data: bytes, now: float = 2.0) -> int:
    """Feed backend bytes; on RELEASE the backend goes back, as the shell does it."""
    verdict = c.feed_backend(data, now)
    if verdict == RELEASE:
        c.detach()
    return verdict


def take(buf: bytearray) -> bytes:
    out = bytes(buf)
    buf.clear()
    return out


def test_simple_query_round_trip_releases_the_backend():
    c = core()
    attach(c, query("select 1"))
    assert take(c.to_backend) == query("select 1")
    answer = ROWDESC + row("1") + complete("SELECT 1") + ready()
    assert backend_says(c, answer, 2.0) == RELEASE
    assert take(c.to_client) == answer
    assert c.counters.queries == [(1, True)]
    assert c.idle()


def test_in_a_transaction_the_backend_stays():
    c = core()
    attach(c, query("begin"))
    c.to_backend.clear()
    assert c.feed_backend(complete("BEGIN") + ready(b"T"), 2.0) == KEEP
    assert c.feed_client(query("select 1"), 3.0) == PROCEED  # same backend, no need to attach
    assert take(c.to_backend) == query("select 1")
    assert c.feed_backend(ROWDESC + row("1") + complete("SELECT 1") + ready(b"T"), 4.0) == KEEP
    c.feed_client(query("commit"), 5.0)
    assert backend_says(c, complete("COMMIT") + ready(), 6.0) == RELEASE


def test_terminate():
    c = core()
    assert c.feed_client(msg(b"X"), 1.0) == TERMINATE


def test_named_parse_is_answered_without_a_backend_and_prepared_where_it_runs():
    c = core()
    assert c.feed_client(parse(b"s1", "select $1") + SYNC, 1.0) == PROCEED
    assert messages(take(c.to_client)) == [b"1", b"Z"]
    assert not c.to_backend
    backend = attach(c, bind(b"s1") + execute() + SYNC)
    key = statement_key(b"select $1\0\0\0")
    sent = take(c.to_backend)
    assert messages(sent) == [b"P", b"B", b"E", b"S"]
    assert key in sent and b"s1" not in sent
    assert backend_says(c, PARSE_DONE + BIND_DONE + row("1") + complete("SELECT 1") + ready(), 2.0) == RELEASE
    # The ParseComplete of O7s's own Parse does not reach the client.
    assert messages(take(c.to_client)) == [b"2", b"D", b"C", b"Z"]
    assert key in backend.prepared
    # Next time on the same backend: no Parse.
    attach(c, bind(b"s1") + execute() + SYNC, backend)
    assert messages(take(c.to_backend)) == [b"B", b"E", b"S"]


def test_a_failing_statement_in_a_pipeline_does_not_break_the_session():
    """Issue 14.2: errors in the middle of a pipelined batch (executemany)."""
    c = core()
    batch = b"".join(parse(b"", "insert into t values ($1)") + bind(b"") + execute() for _ in range(3)) + SYNC
    attach(c, batch)
    c.to_backend.clear()
    answer = PARSE_DONE + BIND_DONE + complete("INSERT 0 1") + PARSE_DONE + BIND_DONE + error("23505") + ready()
    assert backend_says(c, answer, 2.0) == RELEASE
    assert take(c.to_client) == answer
    assert c.counters.queries == [(1, True), (0, False)]
    assert not c.owed


def test_settings_are_read_back_after_the_transaction_and_follow_the_client():
    c = core()
    attach(c, query("set work_mem = '8MB'"))
    c.to_backend.clear()
    assert c.feed_backend(complete("SET") + ready(), 2.0) == KEEP
    assert messages(take(c.to_client)) == [b"C", b"Z"]
    readback = take(c.to_backend)
    assert messages(readback) == [b"Q"] and b"pg_settings" in readback
    answer = row("work_mem", "8MB") + row("role", "none") + row(STATE_ROW, "") + complete("SELECT 3") + ready()
    assert backend_says(c, answer, 3.0) == RELEASE
    assert not c.to_client  # the read-back is O7s's own
    assert c.client_params["work_mem"] == "8MB"
    assert c.counters.queries == [(0, True)]  # one query: the client's


def test_the_read_back_never_lands_inside_a_copy():
    """Issue 14.1: SET then COPY FROM STDIN sent together."""
    c = core()
    attach(c, query("set work_mem = '8MB'") + query("copy t from stdin"))
    assert messages(take(c.to_backend)) == [b"Q", b"Q"]
    c.feed_backend(complete("SET") + ready() + msg(b"G", b"\0\0\0"), 2.0)
    assert not c.to_backend
    assert c.feed_client(msg(b"d", b"1\n") + msg(b"c"), 3.0) == PROCEED
    assert messages(take(c.to_backend)) == [b"d", b"c"]
    assert c.feed_backend(complete("COPY 1") + ready(), 4.0) == KEEP
    assert messages(take(c.to_backend)) == [b"Q"]  # only now, outside any exchange


def test_state_that_cannot_follow_pins_the_client_to_its_backend():
    c = core()
    attach(c, query("create temp table t (x int)"))
    c.to_backend.clear()
    assert c.feed_backend(complete("CREATE TABLE") + ready(), 2.0) == KEEP
    c.to_backend.clear()
    answer = row("role", "none") + row(STATE_ROW, "temporary tables") + complete("SELECT 2") + ready()
    assert c.feed_backend(answer, 3.0) == KEEP
    assert c.pinned == "temporary tables"
    c.feed_client(query("drop table t"), 4.0)  # still on its backend
    c.to_backend.clear()
    c.feed_backend(complete("DROP TABLE") + ready(), 5.0)
    c.to_backend.clear()
    answer = row("role", "none") + row(STATE_ROW, "") + complete("SELECT 2") + ready()
    assert backend_says(c, answer, 6.0) == RELEASE
    assert not c.pinned


def test_role_and_custom_settings_follow():
    c = core()
    attach(c, query("set role app; set myapp.tenant = 't1'"))
    c.to_backend.clear()
    c.feed_backend(complete("SET") + complete("SET") + ready(), 2.0)
    readback = take(c.to_backend)
    assert b"myapp.tenant" in readback and b"'role'" in readback
    answer = (row("role", "app") + row("myapp.tenant", "t1") + row(STATE_ROW, "") + complete("SELECT 3")
              + ready())
    assert backend_says(c, answer, 3.0) == RELEASE
    assert c.client_params["role"] == "app" and c.client_params["myapp.tenant"] == "t1"


@pytest.mark.parametrize("sql, expected", [
    ("select abalance from pgbench_accounts where aid = 1", False),
    ("select count(*) from t where x in (1, 2)", False),
    ("insert into t (a, b) values (1, 2)", False),
    ("select my_function()", True),
    ("SET ROLE x", True),
    ("/* hi */ set search_path = a", True),
    ("select set_config('role', 'x', false)", True),
    ("create temporary table t (x int)", True),
    ("prepare p as select 1", True),
    ("listen ch", True),
    ("select pg_advisory_lock(1)", True),
    ('select "Quoted"()', True),
    ("update t set x = 1", False),
    ("select abalance from pgbench_accounts where aid = 1;\x00", False),  # one statement, its ";" at the end
    ("  \n-- note\n  SET work_mem = '8MB' ;", True),  # whitespace and comments before the keyword
    ("select 1; set role x", True),  # a later statement
    ("select 1 ;\n discard all;", True),
    ("select 'a;b' from t; listen ch", True),
])
def test_which_statements_may_change_session_state(sql, expected):
    assert may_change_state(sql.encode()) is expected
    assert may_change_state(bytearray(sql.encode())) is expected  # as the core hands it a slice


def test_rate_limit_refusal_answers_and_skips_the_query():
    c = core(tokens=False)
    assert c.feed_client(query("select 1"), 1.0) == NEED_TOKEN
    c.token_refused(ClientError("53400", "rate limit exceeded", fatal=False))
    assert messages(take(c.to_client)) == [b"E", b"Z"]
    assert c.resume(1.0) == PROCEED
    assert c.counters.refused == 1 and not c.to_backend


def test_a_throttled_token_counts_as_throttled():
    c = core(tokens=False)
    assert c.feed_client(query("select 1"), 1.0) == NEED_TOKEN
    c.token_granted(waited=True)
    assert c.resume(1.0) == NEED_BACKEND
    assert c.counters.throttled == 1


def test_attach_failure_answers_the_query_and_keeps_the_session():
    c = core()
    assert c.feed_client(query("select 1") + query("select 2"), 1.0) == NEED_BACKEND
    c.attach_failed(ClientError("53P01", "no connection", fatal=False))
    assert messages(take(c.to_client)) == [b"E", b"Z"]
    assert c.resume(1.0) == NEED_BACKEND  # the second query asks again


def test_large_messages_stream_through_without_being_buffered():
    c = core()
    sql = b"select '" + b"x" * (4 * STREAM_AT) + b"'\0"
    whole = b"Q" + struct.pack("!i", len(sql) + 4) + sql
    assert c.feed_client(whole[:8192], 1.0) == NEED_BACKEND
    c.attached(BackendState())
    assert c.resume(1.0) == PROCEED
    sent = take(c.to_backend)
    for pos in range(8192, len(whole), 65536):
        assert c.feed_client(whole[pos:pos + 65536], 1.0) == PROCEED
        assert c.input_buffered() == 0
        sent += take(c.to_backend)
    assert sent == whole


def test_invalid_message_type_is_a_protocol_violation():
    c = core()
    with pytest.raises(ProtocolViolation):
        c.feed_client(b"\x01\0\0\0\4", 1.0)


def test_oversized_control_message_is_refused_before_it_is_buffered():
    c = core()
    with pytest.raises(ProtocolViolation):
        c.feed_client(b"S" + struct.pack("!i", 10 << 20), 1.0)


def test_session_mode_passes_statement_names_through():
    c = core(transaction_mode=False)
    backend = BackendState()
    c.attached(backend)
    c.feed_client(parse(b"s1", "select 1") + bind(b"s1") + execute() + SYNC, 1.0)
    sent = take(c.to_backend)
    assert sent == parse(b"s1", "select 1") + bind(b"s1") + execute() + SYNC
    assert c.feed_backend(PARSE_DONE + BIND_DONE + complete("SELECT 1") + ready(), 2.0) == KEEP


# --- byte streams split at every boundary ------------------------------------------------------

CONVERSATION = [
    (parse(b"s1", "select $1") + bind(b"s1") + msg(b"D", b"P\0") + execute() + SYNC,
     PARSE_DONE + BIND_DONE + ROWDESC + row("1") + complete("SELECT 1") + ready()),
    (query("select 1; select 2"),
     ROWDESC + row("1") + complete("SELECT 1") + ROWDESC + row("2") + complete("SELECT 2") + ready()),
    (parse(b"", "bad") + bind(b"") + execute() + SYNC, error("42601") + ready()),
]


def run_conversation(split: int) -> tuple[bytes, bytes]:
    c = core()
    backend = BackendState()
    to_backend = b""
    to_client = b""
    for client_bytes, backend_bytes in CONVERSATION:
        for part in (client_bytes[:split], client_bytes[split:]):
            action = c.feed_client(part, 1.0)
            while action == NEED_BACKEND:
                c.attached(backend)
                action = c.resume(1.0)
            assert action == PROCEED
        to_backend += take(c.to_backend)
        for part in (backend_bytes[:split], backend_bytes[split:]):
            if backend_says(c, part, 2.0) == RELEASE:
                c.detach()
        to_client += take(c.to_client)
    return to_backend, to_client


def test_splitting_the_streams_at_every_boundary_changes_nothing():
    whole = run_conversation(10 ** 6)
    longest = max(max(len(a), len(b)) for a, b in CONVERSATION)
    for split in range(longest + 1):
        assert run_conversation(split) == whole, split


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=30))
def test_random_chunking_of_client_and_backend_streams(sizes):
    """However the bytes arrive, the same bytes go each way."""
    c = core()
    backend = BackendState()
    client_stream = b"".join(cb for cb, _ in CONVERSATION)
    backend_stream = b"".join(bb for _, bb in CONVERSATION)
    pos, i = 0, 0
    while pos < len(client_stream):
        n = sizes[i % len(sizes)]
        i += 1
        action = c.feed_client(client_stream[pos:pos + n], 1.0)
        pos += n
        while action == NEED_BACKEND:
            c.attached(backend)
            action = c.resume(1.0)
    pos = 0
    while pos < len(backend_stream):
        n = sizes[i % len(sizes)]
        i += 1
        c.feed_backend(backend_stream[pos:pos + n], 2.0)
        pos += n
    expected_to_client = PARSE_DONE + BIND_DONE + ROWDESC + row("1") + complete("SELECT 1") + ready()
    got = take(c.to_client)
    # The first batch's ParseComplete is the client's own (the statement was prepared with its Parse).
    assert got.startswith(expected_to_client)
    assert got.endswith(error("42601") + ready())
    assert not c.owed


def test_large_backend_rows_are_relayed_as_they_arrive():
    c = core()
    attach(c, query("select big"))
    c.to_backend.clear()
    big = row("x" * (3 * 256 * 1024))
    answer = ROWDESC + big + complete("SELECT 1") + ready()
    relayed = b""
    for pos in range(0, len(answer), 50000):
        backend_says(c, answer[pos:pos + 50000])
        relayed += take(c.to_client)
        assert len(c._bbuf) - c._bpos < 60000  # nothing of the big row is held back
    assert relayed == answer
    assert c.counters.queries == [(1, True)] and c.idle()


# --- fuzzing the core directly -------------------------------------------------------------------

frontend_message = st.tuples(st.sampled_from(list(b"QPBEDCSHFdcfX")) | st.integers(0, 255), st.binary(max_size=40))
backend_message = st.tuples(st.sampled_from(list(b"Z123TnCIsESDNAGHtV")), st.binary(max_size=40))


@settings(max_examples=300, deadline=None)
@given(st.lists(frontend_message, max_size=12), st.lists(backend_message, max_size=12), st.booleans(),
       st.integers(1, 64))
def test_fuzzed_streams_raise_only_protocol_errors(client_msgs, backend_msgs, transaction_mode, chunk):
    """Whatever arrives, the core answers, or refuses with a protocol or client error; never anything else."""
    c = core(transaction_mode=transaction_mode)
    if not transaction_mode:
        c.attached(BackendState())
    client_stream = b"".join(bytes([t]) + struct.pack("!i", len(p) + 4) + p for t, p in client_msgs)
    backend_stream = b"".join(bytes([t]) + struct.pack("!i", len(p) + 4) + p for t, p in backend_msgs)
    try:
        for pos in range(0, len(client_stream), chunk):
            action = c.feed_client(client_stream[pos:pos + chunk], 1.0)
            while action in (NEED_BACKEND, NEED_TOKEN):
                if action == NEED_BACKEND:
                    c.attached(BackendState())
                else:
                    c.token_granted(False)
                action = c.resume(1.0)
            if action == TERMINATE:
                return
        if c.backend is not None:
            for pos in range(0, len(backend_stream), chunk):
                if c.feed_backend(backend_stream[pos:pos + chunk], 2.0) == RELEASE:
                    c.detach()
    except (ProtocolViolation, ClientError):
        pass


def test_named_statements_are_kept_whole_up_to_their_cap_and_refused_past_it():
    c = core()
    sql = "select '" + "x" * (512 * 1024) + "'"
    whole = parse(b"big", sql)
    assert c.feed_client(whole[:100_000], 1.0) == PROCEED and not c.to_client  # waits for the rest
    assert c.feed_client(whole[100_000:] + SYNC, 1.0) == PROCEED
    assert messages(take(c.to_client)) == [b"1", b"Z"]
    too_big = parse(b"huge", "select '" + "x" * (2 << 20) + "'")
    action = c.feed_client(too_big[:8192], 1.0)
    while action == NEED_BACKEND:
        c.attached(BackendState())
        action = c.resume(1.0)
    c.feed_client(too_big[8192:] + SYNC, 1.0)
    got = take(c.to_client)
    assert b"54000" in got and messages(got)[-1] == b"Z"
    assert not c.to_backend


# ------------------------------------------------------------------------------ notifications (issue 14)


def notification(pid: int, channel: str = "ch", payload: str = "hi") -> bytes:
    return msg(b"A", struct.pack("!i", pid) + channel.encode() + b"\0" + payload.encode() + b"\0")


CLIENT_PID = 5_000_001  # a transaction-mode pid (above any Linux pid)


def test_own_notification_names_the_pid_the_client_was_given():
    """The parity harness found it: in transaction mode a client's own NOTIFY came back with its backend's
    pid, which the client never saw, so it could not tell its own notifications from others'."""
    c = SessionCore(transaction_mode=True, counters=Counters(), pool_statements=PoolStatements(),
                    client_params={"client_encoding": "UTF8"}, take_token=lambda: True, client_pid=CLIENT_PID)
    backend = BackendState()
    backend.pid = 4242
    attach(c, query("notify ch, 'hi'"), backend)
    c.to_backend.clear()
    c.feed_backend(complete("NOTIFY") + notification(4242) + notification(777, payload="other") + ready(), 2.0)
    assert take(c.to_client) == (complete("NOTIFY") + notification(CLIENT_PID) + notification(777, payload="other")
                                 + ready())


def test_session_mode_notifications_pass_untouched():
    c = SessionCore(transaction_mode=False, counters=Counters(), pool_statements=PoolStatements(),
                    client_params={}, take_token=lambda: True, client_pid=4242)
    backend = BackendState()
    backend.pid = 4242
    attach(c, query("notify ch"), backend)
    c.feed_backend(complete("NOTIFY") + notification(4242) + ready(), 2.0)
    assert take(c.to_client) == complete("NOTIFY") + notification(4242) + ready()


def test_a_notification_during_the_read_back_reaches_the_client():
    """O7s's hidden read-back query swallows its own answer, never a notification that arrives meanwhile
    (the client would wait for it for ever)."""
    c = core()
    attach(c, query("listen ch; select 1"))  # not one LISTEN alone: the backend runs it, and keeps the client
    c.to_backend.clear()
    c.feed_backend(complete("LISTEN") + ready(), 2.0)
    assert messages(take(c.to_client)) == [b"C", b"Z"]
    assert messages(take(c.to_backend)) == [b"Q"]  # the read-back
    answer = (row("role", "none") + notification(999) + row(STATE_ROW, "LISTEN") + complete("SELECT 2")
              + ready())
    assert c.feed_backend(answer, 3.0) == KEEP
    assert take(c.to_client) == notification(999)
    assert c.pinned == "LISTEN"


@pytest.mark.parametrize("payload", [
    b"\0select 1",                       # no end of the text
    b"\0select 1\0",                     # no parameter type count
    b"\0select 1\0\0\1",                 # one type announced, none sent
    b"\0select 1\0\0\0\0\0\0\x17",       # none announced, one sent
    b"\0select 1\0\xff\xff",             # a negative count
])
def test_a_malformed_unnamed_parse_is_a_protocol_violation(payload):
    c = core()
    with pytest.raises(ProtocolViolation, match="Parse message"):
        attach(c, msg(b"P", payload) + SYNC)


@pytest.mark.parametrize("payload", [b"", b"S", b"X\0", b"Pportal"])
def test_a_malformed_describe_is_a_protocol_violation(payload):
    c = core()
    with pytest.raises(ProtocolViolation, match="malformed Describe"):
        attach(c, msg(b"D", payload) + SYNC)


def test_an_unnamed_parse_is_sent_on_whole_and_its_text_is_judged_alone():
    c = core()
    batch = msg(b"P", b"\0SET search_path = $1\0\0\1\0\0\0\x19") + bind(b"") + execute() + SYNC
    attach(c, batch)
    assert take(c.to_backend) == batch
    assert backend_says(c, PARSE_DONE + BIND_DONE + complete("SET") + ready()) == KEEP  # read back first
    assert messages(take(c.to_backend)) == [b"Q"]


def test_a_message_refused_while_it_waited_for_a_backend_leaves_the_next_one_routed_afresh():
    c = core()
    assert c.feed_client(query("select 1"), 1.0) == NEED_BACKEND
    c.attach_failed(ClientError("53300", "no backend", fatal=False))
    assert messages(take(c.to_client)) == [b"E", b"Z"]
    # Not taken as the refused one was (straight to forwarding): a local DEALLOCATE is answered here.
    assert c.feed_client(parse(b"s1", "select 1") + SYNC, 1.0) == PROCEED
    assert c.feed_client(query("DEALLOCATE s1"), 2.0) == PROCEED
    assert messages(take(c.to_client)) == [b"1", b"Z", b"C", b"Z"]
    assert c.backend is None


@pytest.mark.parametrize("status", [b"", b"II"])
def test_a_ready_for_query_of_the_wrong_length_is_a_protocol_violation(status):
    c = core()
    attach(c, query("select 1"))
    with pytest.raises(ProtocolViolation, match="ReadyForQuery length"):
        c.feed_backend(complete("SELECT 1") + msg(b"Z", status), 2.0)


def test_with_a_backend_attached_each_query_and_execute_still_waits_for_its_token():
    tokens = [True]
    c = SessionCore(transaction_mode=True, counters=Counters(), pool_statements=PoolStatements(),
                    client_params={"client_encoding": "UTF8"}, take_token=lambda: tokens.pop() if tokens else False)
    attach(c, query("begin"))
    c.to_backend.clear()
    assert c.feed_backend(complete("BEGIN") + ready(b"T"), 2.0) == KEEP
    batch = parse(b"", "select 1") + bind(b"") + execute() + SYNC
    assert c.feed_client(query("select 2") + batch, 3.0) == NEED_TOKEN
    assert not c.to_backend  # nothing of it goes before its token
    c.token_granted(waited=False)
    assert c.resume(3.0) == NEED_TOKEN  # the Query went; the Execute waits for its own
    assert take(c.to_backend) == query("select 2") + parse(b"", "select 1") + bind(b"")
    c.token_granted(waited=False)
    assert c.resume(3.0) == PROCEED
    assert take(c.to_backend) == execute() + SYNC


def test_with_a_backend_attached_take_overs_are_still_seen():
    c = core()
    attach(c, query("begin"))
    c.to_backend.clear()
    assert c.feed_backend(complete("BEGIN") + ready(b"T"), 2.0) == KEEP
    c.feed_client(parse(b"s1", "select 1") + SYNC, 3.0)  # a named statement of the client's
    assert messages(take(c.to_backend)) == [b"P", b"S"]
    c.feed_backend(PARSE_DONE + ready(b"T"), 3.5)
    take(c.to_client)
    # DEALLOCATE of it is O7s's business even mid-transaction (the server knows it by another name).
    assert c.feed_client(query("deallocate s1"), 4.0) == PROCEED
    assert b"s1" not in bytes(c.to_backend)


@pytest.mark.parametrize("with_backend", [False, True])
def test_an_empty_parse_is_a_protocol_violation(with_backend):
    c = core()
    if with_backend:
        attach(c, query("begin"))
        c.feed_backend(complete("BEGIN") + ready(b"T"), 2.0)
    with pytest.raises(ProtocolViolation):  # not an IndexError (the fuzz test found one)
        c.feed_client(msg(b"P") + SYNC, 3.0)
        c.attached(BackendState())
        c.resume(3.0)
