"""LISTEN/NOTIFY in transaction mode, sans-IO: the session core's decisions and the listener's, with bytes."""

from __future__ import annotations

import struct

import pytest
from test_proxy_session import (
    BIND_DONE,
    PARSE_DONE,
    PROCEED,
    ROWDESC,
    SYNC,
    attach,
    backend_says,
    bind,
    complete,
    core,
    error,
    execute,
    messages,
    msg,
    parse,
    query,
    ready,
    row,
    take,
)

from o7s_cluster.pgwire import messages as m
from o7s_cluster.pgwire.errors import ClientError
from o7s_cluster.proxy.listen import (
    MAX_CHANNELS_PER_CLIENT,
    MAX_QUEUED_NOTIFICATIONS,
    ListenerCore,
    notification_channel,
    parse_listen,
    quote_channel,
)
from o7s_cluster.proxy.relay import KEEP, RELEASE
from o7s_cluster.proxy.backend import BackendState
from o7s_cluster.proxy.session import NEED_BACKEND, NEED_LISTEN, NEED_QUIET


def note(channel: bytes, payload: bytes = b"", pid: int = 4242) -> bytes:
    body = struct.pack("!i", pid) + channel + b"\0" + payload + b"\0"
    return b"A" + struct.pack("!i", len(body) + 4) + body


def sender(message: bytes) -> int:
    return struct.unpack_from("!i", message, 5)[0]


def op(sql: str) -> tuple[bool, bytes] | None:
    data = sql.encode()
    found = parse_listen(data, 0, len(data))
    return None if found is None else (found.listen, found.channel)


# --- which statements O7s takes over ---------------------------------------------------------------


def test_parse_listen_names_as_the_server_does():
    assert op("LISTEN foo") == (True, b"foo")
    assert op("  listen FooBar ;  ") == (True, b"foobar")          # unquoted: folded to lower case
    assert op('LISTEN "Mixed Case"') == (True, b"Mixed Case")      # quoted: as written
    assert op('LISTEN "a""b"') == (True, b'a"b')
    assert op("UNLISTEN foo") == (False, b"foo")
    assert op("unlisten *") == (False, b"*")
    assert op("LISTEN ÜnI") == (True, "Üni".encode())              # only ASCII letters fold
    assert op("listen ABC_1$") == (True, b"abc_1$")


@pytest.mark.parametrize("sql", [
    "LISTEN *",                      # not valid SQL: the server says so
    "LISTEN a; SELECT 1",            # several statements: the backend runs them (and keeps the client)
    "LISTEN",                        # a syntax error: the server's own
    "/* c */ LISTEN a",              # a comment first
    "LISTEN " + "x" * 64,            # the server would truncate it (with a NOTICE)
    "NOTIFY a",
    "listening",
])
def test_other_statements_are_left_to_the_server(sql):
    assert op(sql) is None


def test_quote_channel():
    assert quote_channel(b'we"ird name') == b'"we""ird name"'


# --- the session core ------------------------------------------------------------------------------


def listen(c, sql: str, *, confirm: bool = True) -> bytes:
    """A LISTEN/UNLISTEN outside a transaction: the core asks for the listener, then answers."""
    assert c.feed_client(query(sql), 1.0) == NEED_LISTEN
    c.listen_done(None if confirm else ClientError("08006", "no listener", fatal=False))
    assert c.resume(1.0) == PROCEED
    return take(c.to_client)


def test_listen_outside_a_transaction_needs_no_backend():
    c = core()
    assert c.feed_client(query("LISTEN jobs"), 1.0) == NEED_LISTEN
    assert c.listen_target() == {b"jobs"}
    assert c.listens.active == set()  # not before the listener serves it
    c.listen_done(None)
    assert c.resume(1.0) == PROCEED
    assert messages(take(c.to_client)) == [b"C", b"Z"]
    assert c.backend is None and c.listens.active == {b"jobs"}
    assert c.to_backend == b""
    assert listen(c, "UNLISTEN jobs") == complete("UNLISTEN") + ready()
    assert c.listens.active == set()


def test_a_listener_that_cannot_be_reached_is_an_error_and_changes_nothing():
    c = core()
    out = listen(c, "LISTEN jobs", confirm=False)
    assert messages(out) == [b"E", b"Z"] and b"no listener" in out
    assert c.listens.active == set()
    assert c.feed_client(query("select 1"), 2.0) == NEED_BACKEND  # the session goes on


def test_notifications_reach_an_idle_client_at_once_and_only_on_its_channels():
    c = core()
    listen(c, "LISTEN a")
    assert c.notification(note(b"a", b"1"))
    assert not c.notification(note(b"b", b"2"))
    assert take(c.to_client) == note(b"a", b"1")


def test_notifications_wait_while_the_client_is_in_a_response_or_a_transaction():
    c = core()
    listen(c, "LISTEN a")
    attach(c, query("BEGIN"))
    c.to_backend.clear()
    c.notification(note(b"a", b"during BEGIN"))
    assert c.to_client == b""
    c.feed_backend(complete("BEGIN") + ready(b"T"), 2.0)
    c.notification(note(b"a", b"in the block"))
    assert messages(take(c.to_client)) == [b"C", b"Z"]  # nothing delivered inside the block
    c.feed_client(query("COMMIT"), 3.0)
    assert backend_says(c, complete("COMMIT") + ready(), 4.0) == RELEASE
    assert take(c.to_client) == complete("COMMIT") + ready() + note(b"a", b"during BEGIN") + note(b"a", b"in the block")


def test_listen_in_a_block_takes_effect_at_commit():
    c = core()
    attach(c, query("BEGIN"))
    c.to_backend.clear()
    c.feed_backend(complete("BEGIN") + ready(b"T"), 2.0)
    take(c.to_client)
    assert c.feed_client(query("LISTEN a"), 3.0) == PROCEED  # answered at once, inside the block
    assert take(c.to_client) == complete("LISTEN") + ready(b"T")
    assert c.to_backend == b""
    assert c.listen_changed and c.listens.wanted() == {b"a"} and c.listens.active == set()
    c.listen_changed = False
    c.notification(note(b"a", b"own NOTIFY"))  # the block's own NOTIFY reaches the listener first
    c.feed_client(query("COMMIT"), 4.0)
    assert backend_says(c, complete("COMMIT") + ready(), 5.0) == RELEASE
    assert c.listen_changed and c.listens.active == {b"a"}
    assert take(c.to_client) == complete("COMMIT") + ready() + note(b"a", b"own NOTIFY")


def test_listen_in_a_block_is_dropped_at_rollback_with_what_waited_for_it():
    c = core()
    listen(c, "LISTEN kept")
    attach(c, query("BEGIN"))
    c.to_backend.clear()
    c.feed_backend(complete("BEGIN") + ready(b"T"), 2.0)
    c.feed_client(query("LISTEN dropped"), 3.0)
    c.feed_client(query("UNLISTEN kept"), 3.0)
    take(c.to_client)
    c.notification(note(b"dropped"))
    c.notification(note(b"kept", b"k"))
    c.feed_client(query("ROLLBACK"), 4.0)
    assert backend_says(c, complete("ROLLBACK") + ready(), 5.0) == RELEASE
    assert c.listens.active == {b"kept"} and c.listens.pending == []
    assert take(c.to_client) == complete("ROLLBACK") + ready() + note(b"kept", b"k")


def test_unlisten_in_a_block_drops_at_commit_what_waited_on_its_channel():
    c = core()
    listen(c, "LISTEN a")
    attach(c, query("BEGIN"))
    c.to_backend.clear()
    c.feed_backend(complete("BEGIN") + ready(b"T"), 2.0)
    c.feed_client(query("UNLISTEN *"), 3.0)
    take(c.to_client)
    assert c.listens.wanted() == {b"a"}  # still listened on until COMMIT
    c.notification(note(b"a"))
    c.feed_client(query("COMMIT"), 4.0)
    assert backend_says(c, complete("COMMIT") + ready(), 5.0) == RELEASE
    assert take(c.to_client) == complete("COMMIT") + ready()
    assert c.listens.wanted() == set()


def test_listen_in_a_failed_block_goes_to_the_server_which_refuses_it():
    c = core()
    attach(c, query("BEGIN"))
    c.to_backend.clear()
    c.feed_backend(complete("BEGIN") + ready(b"E"), 2.0)
    assert c.feed_client(query("LISTEN a"), 3.0) == PROCEED
    assert c.to_backend == query("LISTEN a")


def test_listen_behind_a_query_in_flight_is_answered_after_it():
    c = core()
    attach(c, query("select pg_sleep(1)"))
    assert c.feed_client(query("LISTEN a"), 2.0) == PROCEED
    assert take(c.to_backend) == query("select pg_sleep(1)")  # never the backend's
    assert backend_says(c, complete("SELECT 1") + ready(), 3.0) == RELEASE
    assert take(c.to_client) == complete("SELECT 1") + ready() + complete("LISTEN") + ready()
    assert c.listens.active == {b"a"} and c.listen_changed


def test_listen_while_o7s_reads_the_session_back_is_still_taken_over():
    c = core()
    attach(c, query("SET work_mem = '8MB'"))
    c.to_backend.clear()
    assert c.feed_backend(complete("SET") + ready(), 2.0) == KEEP  # the read-back goes out
    assert c.owed and all(p.hidden for p in c.owed)
    take(c.to_client)
    c.to_backend.clear()
    assert c.feed_client(query("LISTEN a"), 3.0) == NEED_LISTEN
    c.listen_done(None)
    c.resume(3.0)
    assert c.to_backend == b"" and c.to_client == b""  # answered after the read-back's end
    assert backend_says(c, complete("SELECT 1") + ready(), 4.0) == RELEASE
    assert take(c.to_client) == complete("LISTEN") + ready()


def test_session_mode_relays_listen_as_it_is():
    c = core(transaction_mode=False)
    attach(c, query("LISTEN a"))
    assert take(c.to_backend) == query("LISTEN a")


def test_another_client_encoding_keeps_the_old_way():
    c = core()
    c.client_params["client_encoding"] = "LATIN1"
    assert c.feed_client(query("LISTEN a"), 1.0) == NEED_BACKEND


def test_queued_notifications_are_capped():
    c = core()
    listen(c, "LISTEN a")
    attach(c, query("BEGIN"))
    for i in range(MAX_QUEUED_NOTIFICATIONS):
        c.notification(note(b"a", str(i).encode()))
    assert not c.listens.overflow
    c.notification(note(b"a", b"one too many"))
    assert str(MAX_QUEUED_NOTIFICATIONS) in c.listens.overflow


# --- the listener connection -----------------------------------------------------------------------


def statements(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack_from("!i", data, pos + 1)
        out.append(data[pos + 5:pos + 1 + n].rstrip(b"\0"))
        pos += 1 + n
    return out


def test_listener_listens_on_the_union_and_unlistens_with_the_last_client():
    lc = ListenerCore()
    lc.want("s1", 1001, {b"a", b"b"})
    lc.want("s2", 1002, {b"b", b'we"ird'})
    assert sorted(statements(lc.statements())) == [b'LISTEN "a"', b'LISTEN "b"', b'LISTEN "we""ird"']
    assert lc.statements() == b""  # nothing twice
    assert not lc.confirmed({b"a"})
    lc.feed(complete("LISTEN") + ready() + complete("LISTEN") + ready())
    lc.feed(complete("LISTEN") + ready())
    assert lc.confirmed({b"a", b"b", b'we"ird'})
    lc.drop("s1")
    assert statements(lc.statements()) == [b'UNLISTEN "a"']
    lc.feed(complete("UNLISTEN") + ready())
    lc.drop("s2")
    assert sorted(statements(lc.statements())) == [b'UNLISTEN "b"', b'UNLISTEN "we""ird"']
    assert not lc.idle()
    lc.feed(complete("UNLISTEN") + ready() + complete("UNLISTEN") + ready())
    assert lc.idle()


def test_listener_routes_a_notification_to_every_client_on_its_channel():
    lc = ListenerCore()
    for i in range(50):
        lc.want(f"s{i}", 1000 + i, {b"ch"})
    lc.want("other", 2000, {b"elsewhere"})
    n = note(b"ch", b"x", pid=77)
    [(message, pid)] = lc.feed(n)
    routed = lc.route(message, 0)
    assert sorted(k for k, _ in routed) == sorted(f"s{i}" for i in range(50))
    assert all(out == n for _, out in routed)


def test_a_clients_own_notification_carries_the_pid_it_was_given():
    lc = ListenerCore()
    lc.want("me", 5_000_001, {b"ch"})
    lc.want("you", 5_000_002, {b"ch"})
    n = note(b"ch", pid=321)  # sent by the backend that served "me" last
    routed = dict(lc.route(n, 5_000_001))
    assert sender(routed["me"]) == 5_000_001
    assert sender(routed["you"]) == 321
    assert notification_channel(routed["me"]) == b"ch"


def test_listener_after_a_reconnect_listens_on_everything_again():
    lc = ListenerCore()
    lc.want("s", 1, {b"a", b"b"})
    lc.statements()
    lc.feed(complete("LISTEN") + ready() + complete("LISTEN") + ready())
    lc.reset()
    assert not lc.confirmed({b"a"})
    assert sorted(statements(lc.statements())) == [b'LISTEN "a"', b'LISTEN "b"']


def test_a_listen_the_server_refuses_is_reported_not_retried_for_ever():
    lc = ListenerCore()
    lc.want("s", 1, {b"a"})
    lc.statements()
    lc.feed(m.error_response("ERROR", "42501", "permission denied") + ready())
    assert not lc.confirmed({b"a"}) and "permission denied" in lc.error_for({b"a"})
    assert lc.statements() == b""


def test_own_notify_is_relayed_before_the_ready_for_query_as_directly():
    """PostgreSQL sends a session its own notification before the ReadyForQuery that ends the NOTIFY's
    transaction: the core holds that ReadyForQuery until the listener has relayed what was sent."""
    c = core()
    listen(c, "LISTEN a")
    attach(c, query("SELECT pg_notify('a', 'me')"))
    c.to_backend.clear()
    answer = ROWDESC + row("") + complete("SELECT 1")
    assert c.feed_backend(answer + ready(), 2.0) == KEEP
    assert c.barrier_wanted and take(c.to_client) == answer
    assert not c.idle()
    c.notification(note(b"a", b"me"))  # from the listener, meanwhile
    assert c.to_client == b""
    c.barrier_done()
    assert backend_says(c, b"", 3.0) == RELEASE
    assert take(c.to_client) == note(b"a", b"me") + ready()


def test_no_barrier_without_a_notify_or_when_not_listening():
    c = core()
    listen(c, "LISTEN a")
    attach(c, query("SELECT 1"))
    assert backend_says(c, complete("SELECT 1") + ready(), 2.0) == RELEASE and not c.barrier_wanted
    other = core()
    attach(other, query("NOTIFY a"))
    assert backend_says(other, complete("NOTIFY") + ready(), 2.0) == RELEASE and not other.barrier_wanted


def test_listener_barrier_is_an_empty_query_passed_at_its_ready_for_query():
    lc = ListenerCore()
    lc.want("s", 1, {b"a"})
    lc.statements()
    lc.feed(complete("LISTEN") + ready())
    seq = lc.barrier()
    assert lc.statements() == m.query("")
    notes = lc.feed(note(b"a", b"x") + msg(b"I") + ready())
    assert [n for n, _ in notes] == [note(b"a", b"x")] and lc.barriers_done >= seq


def test_pipelined_listen_and_unlisten_take_effect_in_their_turn():
    c = core()
    listen(c, "LISTEN a")
    assert c.feed_client(query("NOTIFY a") + query("SELECT pg_notify('a', 'x')") + query("UNLISTEN *")
                         + query("LISTEN b"), 1.0) == NEED_BACKEND
    c.attached(BackendState())
    assert c.resume(1.0) == NEED_QUIET  # the next statement waits for the NOTIFY's own notifications
    assert c.feed_backend(complete("NOTIFY") + ready(), 2.0) == KEEP
    assert c.barrier_wanted and take(c.to_client) == complete("NOTIFY")
    c.notification(note(b"a", b"own 1"))
    c.barrier_done()
    assert backend_says(c, b"", 2.0) == RELEASE
    assert take(c.to_client) == note(b"a", b"own 1") + ready()
    assert c.resume(2.0) == NEED_BACKEND
    c.attached(BackendState())
    assert c.resume(2.0) == PROCEED
    assert take(c.to_backend) == query("NOTIFY a") + query("SELECT pg_notify('a', 'x')")  # the rest is O7s's
    answer = ROWDESC + row("") + complete("SELECT 1")
    c.feed_backend(answer + ready(), 3.0)
    assert c.barrier_wanted
    c.notification(note(b"a", b"x"))
    c.barrier_done()
    assert backend_says(c, b"", 3.0) == RELEASE
    assert take(c.to_client) == (answer + note(b"a", b"x") + ready() + complete("UNLISTEN") + ready()
                                 + complete("LISTEN") + ready())
    assert c.listens.active == {b"b"} and c.listen_changed


def test_a_pipelined_listen_in_a_failed_block_is_refused_as_by_the_server():
    c = core()
    attach(c, query("BEGIN") + query("SELECT 1/0") + query("LISTEN a"))
    c.feed_backend(complete("BEGIN") + ready(b"T") + error("22012") + ready(b"E"), 2.0)
    out = take(c.to_client)
    assert messages(out)[-2:] == [b"E", b"Z"] and b"25P02" in out and out.endswith(ready(b"E"))
    assert c.listens.wanted() == set()


def test_after_a_statement_that_may_notify_the_next_one_waits_for_it():
    c = core()
    listen(c, "LISTEN a")
    assert c.feed_client(query("NOTIFY a"), 1.0) == NEED_BACKEND
    c.attached(BackendState())
    assert c.resume(1.0) == PROCEED
    assert c.feed_client(query("SELECT 1"), 1.5) == NEED_QUIET
    assert not c.quiet()
    c.feed_backend(complete("NOTIFY") + ready(b"I"), 2.0)
    c.barrier_done()
    c.feed_backend(b"", 2.0)
    assert c.quiet()
    assert c.resume(2.5) == PROCEED
    assert take(c.to_backend) == query("NOTIFY a") + query("SELECT 1")


def test_copy_data_after_a_statement_that_may_notify_is_never_held():
    """COPY data belongs to the running statement: holding it would wait for ever."""
    c = core()
    listen(c, "LISTEN a")
    attach(c, query("COPY notify_log FROM STDIN"))
    c.feed_backend(msg(b"G", b"\0\0\0"), 2.0)
    assert c.feed_client(msg(b"d", b"1\n") + msg(b"c"), 3.0) == PROCEED
    assert take(c.to_backend) == query("COPY notify_log FROM STDIN") + msg(b"d", b"1\n") + msg(b"c")


def test_channels_per_client_are_capped():
    c = core()
    c.listens.active = {str(i).encode() for i in range(MAX_CHANNELS_PER_CLIENT)}
    assert c.feed_client(query("LISTEN one_more"), 1.0) == PROCEED
    out = take(c.to_client)
    assert b"54000" in out and str(MAX_CHANNELS_PER_CLIENT).encode() in out and out.endswith(ready())
    assert c.feed_client(query("LISTEN \"0\""), 1.0) == NEED_LISTEN  # one it listens on already is fine


# --- the extended protocol (asyncpg's add_listener, pgjdbc, pgx) -------------------------------------


def describe(kind: bytes, name: bytes = b"") -> bytes:
    return msg(b"D", kind + name + b"\0")


def test_asyncpg_add_listener_needs_no_backend():
    """asyncpg prepares the LISTEN (Parse, Describe, Sync), then runs it (Bind, Execute, Sync)."""
    c = core()
    name = b"__asyncpg_stmt_1__"
    assert c.feed_client(parse(name, 'LISTEN "ch"') + describe(b"S", name) + SYNC, 1.0) == PROCEED
    assert messages(take(c.to_client)) == [b"1", b"t", b"n", b"Z"]
    assert c.feed_client(bind(name) + execute() + SYNC, 2.0) == NEED_LISTEN
    assert c.listen_target() == {b"ch"}
    c.listen_done(None)
    assert c.resume(2.0) == PROCEED
    assert take(c.to_client) == BIND_DONE + complete("LISTEN") + ready()
    assert c.to_backend == b"" and c.backend is None and c.listens.active == {b"ch"}
    c.feed_client(parse(b"__asyncpg_stmt_2__", 'UNLISTEN "ch"') + describe(b"S", b"__asyncpg_stmt_2__") + SYNC, 3.0)
    take(c.to_client)
    assert c.feed_client(bind(b"__asyncpg_stmt_2__") + execute() + SYNC, 3.0) == NEED_LISTEN
    c.listen_done(None)
    c.resume(3.0)
    assert take(c.to_client) == BIND_DONE + complete("UNLISTEN") + ready() and c.listens.active == set()


def test_one_batch_of_an_unnamed_listen_is_answered_here():
    c = core()
    batch = parse(b"", "LISTEN jobs") + bind(b"") + describe(b"P") + execute() + SYNC
    assert c.feed_client(batch, 1.0) == NEED_LISTEN
    c.listen_done(None)
    assert c.resume(1.0) == PROCEED
    assert take(c.to_client) == PARSE_DONE + BIND_DONE + msg(b"n") + complete("LISTEN") + ready()
    assert c.to_backend == b"" and c.listens.active == {b"jobs"}


def test_an_extended_listen_the_listener_cannot_serve_fails_its_batch():
    c = core()
    assert c.feed_client(parse(b"", "LISTEN jobs") + bind(b"") + execute() + SYNC, 1.0) == NEED_LISTEN
    c.listen_done(ClientError("08006", "no listener", fatal=False))
    assert c.resume(1.0) == PROCEED
    assert messages(take(c.to_client)) == [b"1", b"2", b"E", b"Z"]
    assert c.listens.active == set() and not c.unsynced


def test_an_extended_listen_inside_a_block_takes_effect_at_commit():
    c = core()
    attach(c, query("BEGIN"))
    c.feed_backend(complete("BEGIN") + ready(b"T"), 2.0)
    take(c.to_client)
    c.to_backend.clear()
    assert c.feed_client(parse(b"", "LISTEN jobs") + bind(b"") + execute() + SYNC, 3.0) == PROCEED
    assert take(c.to_client) == PARSE_DONE + BIND_DONE + complete("LISTEN") + ready(b"T")
    assert c.to_backend == b"" and c.listens.active == set() and c.listens.wanted() == {b"jobs"}
    c.feed_client(query("COMMIT"), 4.0)
    assert backend_says(c, complete("COMMIT") + ready(), 5.0) == RELEASE
    assert c.listens.active == {b"jobs"}


def test_other_extended_statements_are_not_taken_over():
    c = core()
    batch = parse(b"", "SELECT 1") + bind(b"") + execute() + SYNC
    assert c.feed_client(batch, 1.0) == NEED_BACKEND
    attach_rest = c
    attach_rest.attached(BackendState())
    assert c.resume(1.0) == PROCEED
    assert take(c.to_backend) == batch
    named = core()
    assert named.feed_client(parse(b"s1", "LISTEN a") + SYNC, 1.0) == PROCEED
    assert named.feed_client(parse(b"s1", "SELECT 1") + SYNC, 1.0) == PROCEED  # redefined: no longer a LISTEN
    assert named.feed_client(bind(b"s1") + execute() + SYNC, 2.0) == NEED_BACKEND


@pytest.mark.parametrize("spelling", ["UTF8", "utf-8", "'utf-8'", "utf8", "Unicode"])
def test_utf8_however_the_client_spells_it(spelling):
    c = core()
    c.client_params["client_encoding"] = spelling  # asyncpg sends 'utf-8'
    assert c.feed_client(query("LISTEN a"), 1.0) == NEED_LISTEN


def test_parse_listen_after_any_leading_whitespace_and_never_for_other_texts():
    from o7s_cluster.proxy.listen import parse_listen

    for ws in (b"", b" ", b"\t", b"\n", b"\r\n", b"\f", b"\v", b" \t\n"):
        for text, tag in ((b"LISTEN chan", "LISTEN"), (b"unlisten chan;", "UNLISTEN")):
            buf = b"xx" + ws + text + b"yy"
            op = parse_listen(buf, 2, len(buf) - 2)
            assert op is not None and op.tag == tag and op.channel == b"chan", (ws, text)
    for text in (b"", b"select 1", b"/* c */ listen chan", b"-- c\nlisten chan", b"ulisten chan", b"(listen chan)"):
        assert parse_listen(text, 0, len(text)) is None, text
