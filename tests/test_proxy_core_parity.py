"""The sans-IO session core, driven with bytes (no sockets, no trio), for issue 14's parity groups: a cancel
that reaches a query O7s holds back (group 4); answers O7s makes itself in pipeline mode (group 6); statements a client drops (group 7);
named statements after an error."""

from __future__ import annotations

import pytest

from test_proxy_session import (BIND_DONE, CLOSE_DONE, PARSE_DONE, SYNC, Counters, attach, bind, complete, error,
                                execute, messages, msg, parse, query, ready, take)

from o7s_cluster.pgwire.errors import ClientError
from o7s_cluster.proxy.backend import BackendState
from o7s_cluster.proxy.relay import RELEASE
from o7s_cluster.proxy.session import NEED_BACKEND, NEED_TOKEN, PROCEED, SessionCore
from o7s_cluster.proxy.statements import ClientStatements as ClientStatementsFor
from o7s_cluster.proxy.statements import PoolStatements, statement_key


def error_code(data: bytes) -> str:
    """The SQLSTATE of the first ErrorResponse in `data`."""
    start = data.index(b"E") + 5
    for field in data[start:].split(b"\0"):
        if field[:1] == b"C":
            return field[1:].decode()
    raise AssertionError("no SQLSTATE")


class Tokens:
    """A rate limiter the test turns on and off."""

    def __init__(self) -> None:
        self.left = 1000

    def __call__(self) -> bool:
        if self.left > 0:
            self.left -= 1
            return True
        return False


def core(transaction_mode: bool = True, tokens: Tokens | None = None) -> SessionCore:
    return SessionCore(transaction_mode=transaction_mode, counters=Counters(), pool_statements=PoolStatements(),
                       client_params={"client_encoding": "UTF8"}, take_token=tokens or Tokens())


# --- group 4: a cancel while the query waits for a backend or a token ------------------------------


def test_a_query_cancelled_while_it_waits_for_a_backend_is_answered_and_never_runs():
    c = core()
    assert c.feed_client(query("select pg_sleep(30)") + query("select 2"), 1.0) == NEED_BACKEND
    assert c.wait_cancelled() is True
    out = take(c.to_client)
    assert messages(out) == [b"E", b"Z"] and error_code(out) == "57014" and out.endswith(ready(b"I"))
    assert c.resume(1.0) == NEED_BACKEND  # the next query asks again; the cancelled one is gone
    assert not c.to_backend and c.counters.errors == 1


def test_a_batch_cancelled_while_it_waits_for_a_backend_is_skipped_up_to_its_sync():
    c = core()
    batch = parse(b"", "select pg_sleep(30)") + bind(b"") + msg(b"D", b"P\0") + execute() + SYNC
    assert c.feed_client(batch, 1.0) == NEED_BACKEND
    assert c.wait_cancelled() is True
    assert c.resume(1.0) == PROCEED
    out = take(c.to_client)
    assert messages(out) == [b"E", b"Z"] and error_code(out) == "57014"
    assert not c.to_backend and c.idle()


def test_a_query_cancelled_while_it_waits_for_a_token_outside_a_transaction_never_runs():
    for transaction_mode in (True, False):
        tokens = Tokens()
        c = core(transaction_mode, tokens)
        if not transaction_mode:
            c.attached(BackendState())  # session mode: the backend is the client's from login
        tokens.left = 0
        assert c.feed_client(query("select pg_sleep(30)"), 1.0) == NEED_TOKEN
        assert c.wait_cancelled() is True
        assert messages(take(c.to_client)) == [b"E", b"Z"]
        assert c.resume(1.0) == PROCEED and not c.to_backend


def test_a_query_cancelled_while_it_waits_for_a_token_in_a_transaction_runs_to_be_cancelled_there():
    """Answering it here would leave the server's transaction going on as if nothing had failed: it goes to
    its backend (the shell then cancels it there), and the server's own error and status reach the client."""
    tokens = Tokens()
    c = core(tokens=tokens)
    attach(c, query("begin"))
    c.feed_backend(complete("BEGIN") + ready(b"T"), 2.0)
    take(c.to_backend), take(c.to_client)
    tokens.left = 0
    assert c.feed_client(query("select pg_sleep(30)"), 1.0) == NEED_TOKEN
    assert c.wait_cancelled() is False
    assert c.resume(1.0) == PROCEED
    assert take(c.to_backend) == query("select pg_sleep(30)")
    assert c.query_running() and not c.to_client and c.counters.errors == 0


def test_a_pipelined_statement_cancelled_while_it_waits_for_a_token_runs_to_be_cancelled_there():
    """The batch's earlier statements are on the backend: the cancelled one must fail there, so that the
    server rolls the whole implicit transaction back, as directly."""
    tokens = Tokens()
    c = core(transaction_mode=False, tokens=tokens)
    c.attached(BackendState())
    tokens.left = 1
    batch = (parse(b"", "insert into t values (1)") + bind(b"") + execute()
             + parse(b"", "select pg_sleep(30)") + bind(b"") + execute() + SYNC)
    assert c.feed_client(batch, 1.0) == NEED_TOKEN
    assert c.wait_cancelled() is False
    assert c.resume(1.0) == PROCEED
    assert take(c.to_backend) == batch and c.query_running()


# --- group 6: answers O7s makes itself reach the client when the server's would ------------------

FLUSH = msg(b"H")


def test_a_named_parse_answered_without_a_backend_waits_for_the_clients_flush():
    c = core()
    assert c.feed_client(parse(b"s1", "select 1"), 1.0) == PROCEED
    assert not c.to_client  # the server would say nothing yet
    assert c.feed_client(FLUSH, 1.0) == PROCEED
    assert take(c.to_client) == PARSE_DONE
    assert c.feed_client(SYNC, 1.0) == PROCEED  # PQprepare: still no backend
    assert take(c.to_client) == ready() and not c.to_backend


def test_a_named_parse_in_a_batch_is_sent_to_the_server_in_its_place():
    """P B E S with no backend yet: the server answers the Parse itself, a syntax error included."""
    c = core()
    batch = parse(b"s1", "selec 1") + bind(b"s1") + execute() + SYNC
    assert c.feed_client(batch, 1.0) == NEED_BACKEND
    assert not c.to_client
    backend = BackendState()
    c.attached(backend)
    assert c.resume(1.0) == PROCEED
    key = statement_key(b"selec 1\0\0\0")
    sent = take(c.to_backend)
    assert sent.startswith(msg(b"P", key + b"\0selec 1\0\0\0")) and messages(sent) == [b"P", b"B", b"E", b"S"]
    c.feed_backend(error("42601") + ready(), 2.0)
    out = take(c.to_client)
    assert messages(out) == [b"E", b"Z"] and error_code(out) == "42601"  # no ParseComplete of O7s's before it
    assert key not in backend.prepared


def test_a_parse_the_backend_already_has_is_answered_with_the_servers_next_answer():
    c = core()
    backend = attach(c, query("begin"))
    c.feed_backend(complete("BEGIN") + ready(b"T"), 2.0)
    take(c.to_backend), take(c.to_client)
    assert c.feed_client(parse(b"s1", "select 1") + bind(b"s1") + execute() + FLUSH, 1.0) == PROCEED
    sent = take(c.to_backend)
    assert messages(sent) == [b"P", b"B", b"E", b"H"]
    c.feed_backend(PARSE_DONE + BIND_DONE + complete("SELECT 1"), 2.0)
    take(c.to_client)
    # A second name for the same text: the backend has it, O7s answers, and holds the answer.
    assert c.feed_client(parse(b"s2", "select 1"), 1.0) == PROCEED
    assert not c.to_backend and not c.to_client
    assert c.feed_client(bind(b"s2") + execute(), 1.0) == PROCEED
    assert not c.to_client
    c.feed_backend(BIND_DONE + complete("SELECT 1"), 2.0)  # the server flushed past the Parse
    assert messages(take(c.to_client)) == [b"1", b"2", b"C"]
    assert backend.prepared


def test_a_close_answered_here_waits_for_the_sync_and_goes_out_in_order():
    c = core()
    attach(c, parse(b"", "select 1") + bind(b"") + execute() + SYNC)
    c.feed_backend(PARSE_DONE + BIND_DONE + complete("SELECT 1") + ready(), 2.0)
    c.detach()
    take(c.to_client), take(c.to_backend)
    assert c.feed_client(parse(b"s1", "select 1") + SYNC, 1.0) == PROCEED
    assert take(c.to_client) == PARSE_DONE + ready()
    assert c.feed_client(msg(b"C", b"Ss1\0"), 1.0) == PROCEED
    assert not c.to_client
    assert c.feed_client(SYNC, 1.0) == PROCEED
    assert take(c.to_client) == CLOSE_DONE + ready()


def test_an_error_of_o7s_takes_the_held_answers_with_it():
    c = core()
    assert c.feed_client(parse(b"s1", "select 1") + bind(b"s1"), 1.0) == NEED_BACKEND
    c.attach_failed(ClientError("53P01", "no connection", fatal=False))
    assert messages(take(c.to_client)) == [b"1", b"E"]
    assert c.resume(1.0) == PROCEED
    assert c.feed_client(SYNC, 1.0) == PROCEED
    assert take(c.to_client) == ready()


# --- group 7: statements a client drops are dropped on the server ------------------------------------


def in_transaction_with(c: SessionCore, name: bytes, sql: str) -> BackendState:
    backend = attach(c, query("begin"))
    c.feed_backend(complete("BEGIN") + ready(b"T"), 2.0)
    c.feed_client(parse(name, sql) + bind(name) + execute() + SYNC, 1.0)
    c.feed_backend(PARSE_DONE + BIND_DONE + complete("SELECT 1") + ready(b"T"), 2.0)
    take(c.to_backend), take(c.to_client)
    return backend


def test_a_close_in_a_transaction_goes_to_the_server_under_its_name():
    c = core()
    backend = in_transaction_with(c, b"s1", "select 1")
    key = statement_key(b"select 1\0\0\0")
    c.feed_client(msg(b"C", b"Ss1\0") + SYNC, 1.0)
    assert take(c.to_backend) == msg(b"C", b"S" + key + b"\0") + SYNC
    assert key not in backend.prepared
    c.feed_backend(CLOSE_DONE + ready(b"T"), 2.0)
    assert take(c.to_client) == CLOSE_DONE + ready(b"T")  # the server's own answer


def test_deallocate_in_a_transaction_goes_to_the_server_under_its_name():
    c = core()
    backend = in_transaction_with(c, b"s1", "select 1")
    key = statement_key(b"select 1\0\0\0")
    c.feed_client(query("DEALLOCATE s1"), 1.0)
    assert take(c.to_backend) == query(f'DEALLOCATE "{key.decode()}"')
    c.feed_backend(complete("DEALLOCATE") + ready(b"T"), 2.0)
    assert take(c.to_client) == complete("DEALLOCATE") + ready(b"T") and key not in backend.prepared


@pytest.mark.parametrize("sql", ["deallocate s1", "  \n\tDeAllocate PREPARE s1;", "\fDEALLOCATE \"s1\" "])
def test_deallocate_is_taken_however_it_is_spelled(sql):
    """The first-byte pre-check must let every spelling the pattern accepts through."""
    c = core()
    backend = in_transaction_with(c, b"s1", "select 1")
    key = statement_key(b"select 1\0\0\0")
    c.feed_client(query(sql), 1.0)
    assert take(c.to_backend) == query(f'DEALLOCATE "{key.decode()}"')
    c.feed_backend(complete("DEALLOCATE") + ready(b"T"), 2.0)
    assert key not in backend.prepared


@pytest.mark.parametrize("sql", ["select 'deallocate s1'", "xdeallocate s1", "deallocated"])
def test_a_query_that_is_not_a_deallocate_goes_through_as_it_is(sql):
    c = core()
    in_transaction_with(c, b"s1", "select 1")
    c.feed_client(query(sql), 1.0)
    assert take(c.to_backend) == query(sql)


def test_a_statement_another_client_names_stays_and_the_close_is_answered_here():
    pool = PoolStatements()
    other = SessionCore(transaction_mode=True, counters=Counters(), pool_statements=pool,
                        client_params={"client_encoding": "UTF8"}, take_token=Tokens())
    other.statements.define(b"x", _statement("select 1"))
    c = SessionCore(transaction_mode=True, counters=Counters(), pool_statements=pool,
                    client_params={"client_encoding": "UTF8"}, take_token=Tokens())
    backend = in_transaction_with(c, b"s1", "select 1")
    c.feed_client(msg(b"C", b"Ss1\0") + SYNC, 1.0)
    assert take(c.to_backend) == SYNC and backend.prepared  # still named by the other client
    c.feed_backend(ready(b"T"), 2.0)
    assert take(c.to_client) == CLOSE_DONE + ready(b"T")


def _statement(sql: str):
    from o7s_cluster.proxy.statements import Statement
    rest = sql.encode() + b"\0\0\0"
    return Statement(statement_key(rest), rest, False)


def test_dropped_statements_are_closed_on_each_backend_when_next_attached():
    pool = PoolStatements()
    held = [BackendState(), BackendState()]
    keys = [_statement(f"select {i}").key for i in range(3)]
    for backend in held:
        for key in keys:
            backend.prepared.add(key)
    client = ClientStatementsFor(pool)
    for i in range(3):
        client.define(f"s{i}".encode(), _statement(f"select {i}"))
    client.drop(b"s0")
    client.drop(b"s1")
    client.define(b"again", _statement("select 1"))  # named again before any backend looked: it stays
    for backend in held:
        c = SessionCore(transaction_mode=True, counters=Counters(), pool_statements=pool,
                        client_params={"client_encoding": "UTF8"}, take_token=Tokens())
        c.attached(backend)
        assert take(c.to_backend) == msg(b"C", b"S" + keys[0] + b"\0") + SYNC
        assert list(backend.prepared.keys) == keys[1:]
        c.feed_backend(CLOSE_DONE + ready(), 2.0)
        assert not c.to_client


def test_a_backend_behind_the_log_looks_at_all_it_holds():
    from o7s_cluster.proxy import statements
    pool = PoolStatements()
    backend = BackendState()
    client = ClientStatementsFor(pool)
    for i in range(statements.MAX_DROPS_LOGGED + 10):
        st = _statement(f"select {i}")
        if i < 3:
            backend.prepared.add(st.key)
        client.define(b"s", st)  # each redefinition drops the one before
    assert pool.dropped_base > 0
    c = SessionCore(transaction_mode=True, counters=Counters(), pool_statements=pool,
                    client_params={"client_encoding": "UTF8"}, take_token=Tokens())
    c.attached(backend)
    assert not backend.prepared and messages(take(c.to_backend)) == [b"C", b"C", b"C", b"S"]


# --- named statements after an error: the server refuses or skips the rest of the batch up to its Sync ------
# PostgreSQL leaves a name whose Parse failed or was skipped undefined (its Bind: 26000, its Parse again:
# fine) and a statement whose Close was skipped defined; O7s's names must follow.

BAD = "selec 1"


def key_of(sql: str) -> bytes:
    return statement_key(sql.encode() + b"\0\0\0")


def in_transaction(c: SessionCore, backend: BackendState | None = None) -> BackendState:
    backend = attach(c, query("begin"), backend)
    c.feed_backend(complete("BEGIN") + ready(b"T"), 2.0)
    take(c.to_backend), take(c.to_client)
    return backend


def released(c: SessionCore, answer: bytes) -> bytes:
    """The backend's answer ends the transaction: what the client got (the backend goes back)."""
    assert c.feed_backend(answer, 2.0) == RELEASE
    c.detach()
    return take(c.to_client)


def test_a_named_parse_the_server_refuses_leaves_the_name_undefined():
    c = core()
    backend = attach(c, parse(b"s1", BAD) + bind(b"s1") + execute() + SYNC)
    assert take(c.to_backend).startswith(msg(b"P", key_of(BAD) + b"\0" + BAD.encode() + b"\0\0\0"))
    assert error_code(released(c, error("42601") + ready())) == "42601"
    assert c.statements.get(b"s1") is None and not c.pool_statements.refs and key_of(BAD) not in backend.prepared
    # Its Bind reaches the server under the client's name, which the server does not know either: 26000.
    attach(c, bind(b"s1") + execute() + SYNC, backend)
    assert take(c.to_backend) == bind(b"s1") + execute() + SYNC
    out = released(c, error("26000") + ready())
    assert messages(out) == [b"E", b"Z"] and error_code(out) == "26000"
    # Parsed again, the name works.
    attach(c, parse(b"s1", "select 1") + bind(b"s1") + execute() + SYNC, backend)
    key = key_of("select 1")
    assert take(c.to_backend) == parse(key, "select 1") + bind(key) + execute() + SYNC
    assert messages(released(c, PARSE_DONE + BIND_DONE + complete("SELECT 1") + ready())) == [b"1", b"2", b"C", b"Z"]
    assert c.statements.get(b"s1") is not None


def test_of_two_parses_in_one_batch_the_one_the_server_refuses_is_undefined():
    c = core()
    backend = in_transaction(c)
    assert c.feed_client(parse(b"s1", "select 1") + parse(b"s2", BAD) + SYNC, 1.0) == PROCEED
    assert messages(take(c.to_backend)) == [b"P", b"P", b"S"]
    c.feed_backend(PARSE_DONE + error("42601") + ready(b"E"), 2.0)
    assert messages(take(c.to_client)) == [b"1", b"E", b"Z"]
    assert c.statements.get(b"s1") is not None and c.statements.get(b"s2") is None
    assert key_of("select 1") in backend.prepared and key_of(BAD) not in backend.prepared
    c.feed_client(query("rollback"), 1.0)
    take(c.to_backend)
    released(c, complete("ROLLBACK") + ready())
    attach(c, bind(b"s1") + execute() + bind(b"s2") + execute() + SYNC, backend)
    assert take(c.to_backend) == bind(key_of("select 1")) + execute() + bind(b"s2") + execute() + SYNC


def test_parses_the_server_skips_after_an_error_are_undefined():
    """Skipped: one O7s sent and one it answered itself (its text is on the backend); no answer of either
    reaches the client, and neither name is left defined."""
    c = core()
    backend = in_transaction(c)
    backend.prepared.add(key_of("select 3"))
    batch = (parse(b"s1", "select 1/0") + bind(b"s1") + execute() + parse(b"s2", "select 2")
             + parse(b"s3", "select 3") + SYNC)
    assert c.feed_client(batch, 1.0) == PROCEED
    assert messages(take(c.to_backend)) == [b"P", b"B", b"E", b"P", b"S"]
    c.feed_backend(PARSE_DONE + BIND_DONE + error("22012") + ready(b"E"), 2.0)
    assert messages(take(c.to_client)) == [b"1", b"2", b"E", b"Z"]
    assert c.statements.get(b"s1") is not None
    assert c.statements.get(b"s2") is None and c.statements.get(b"s3") is None
    assert key_of("select 2") not in backend.prepared and key_of("select 3") in backend.prepared
    assert not c.owed and c._held == 0


def test_messages_sent_after_the_servers_error_are_skipped_up_to_the_sync():
    """The error came back before the client's Sync (it flushed): the server skips what the client sends
    until then, so a Parse in it defines nothing, a Close drops nothing, and nothing of it is owed."""
    c = core()
    backend = in_transaction_with(c, b"s1", "select 1")
    assert c.feed_client(parse(b"", "select 1/0") + bind(b"") + execute() + FLUSH, 1.0) == PROCEED
    take(c.to_backend)
    c.feed_backend(PARSE_DONE + BIND_DONE + error("22012"), 2.0)
    assert messages(take(c.to_client)) == [b"1", b"2", b"E"]
    later = parse(b"s2", "select 2") + bind(b"s2") + execute() + msg(b"C", b"Ss1\0") + FLUSH + SYNC
    assert c.feed_client(later, 1.0) == PROCEED
    assert take(c.to_backend) == SYNC and not c.to_client
    c.feed_backend(ready(b"E"), 2.0)
    assert take(c.to_client) == ready(b"E") and not c.owed
    assert c.statements.get(b"s2") is None and c.statements.get(b"s1") is not None
    assert key_of("select 1") in backend.prepared


def test_a_close_the_server_skips_after_an_error_leaves_the_statement_defined():
    for shared in (False, True):
        pool = PoolStatements()
        if shared:  # another client names it too: O7s answers the Close itself
            ClientStatementsFor(pool).define(b"x", _statement("select 1"))
        c = SessionCore(transaction_mode=True, counters=Counters(), pool_statements=pool,
                        client_params={"client_encoding": "UTF8"}, take_token=Tokens())
        backend = in_transaction_with(c, b"s1", "select 1")
        batch = parse(b"", "select 1/0") + bind(b"") + execute() + msg(b"C", b"Ss1\0") + SYNC
        assert c.feed_client(batch, 1.0) == PROCEED
        assert messages(take(c.to_backend)) == [b"P", b"B", b"E"] + ([] if shared else [b"C"]) + [b"S"]
        c.feed_backend(PARSE_DONE + BIND_DONE + error("22012") + ready(b"E"), 2.0)
        assert messages(take(c.to_client)) == [b"1", b"2", b"E", b"Z"]  # no CloseComplete
        assert c.statements.get(b"s1") is not None and key_of("select 1") in backend.prepared
        assert pool.refs[key_of("select 1")] == 1 + shared


def test_a_held_parse_complete_goes_out_before_the_servers_error():
    """The server sends the answers it holds with an error: a ParseComplete O7s holds for a message
    before the one that failed too (here the failed one is O7s's own Parse of a statement it answered)."""
    c = core()
    assert c.feed_client(parse(b"s3", "select * from gone") + SYNC, 1.0) == PROCEED  # answered here
    take(c.to_client)
    backend = BackendState()
    backend.prepared.add(key_of("select 1"))
    in_transaction(c, backend)
    assert c.feed_client(parse(b"s2", "select 1") + bind(b"s3"), 1.0) == PROCEED
    assert messages(take(c.to_backend)) == [b"P", b"B"] and not c.to_client
    c.feed_backend(error("42P01"), 2.0)
    assert messages(take(c.to_client)) == [b"1", b"E"] and c._held == 0
    assert c.feed_client(execute() + SYNC, 1.0) == PROCEED
    assert take(c.to_backend) == SYNC
    c.feed_backend(ready(b"E"), 2.0)
    assert take(c.to_client) == ready(b"E") and not c.owed
    # A relation missing now may exist later: the statement stays, as it would directly.
    assert c.statements.get(b"s2") is not None and c.statements.get(b"s3") is not None


def test_a_statement_answered_here_whose_text_the_server_cannot_parse_is_gone_after_its_first_use():
    """Prepared on its own (answered here), its syntax error shows at its first Bind; after that the name
    is undefined, as it has been all along directly."""
    c = core()
    assert c.feed_client(parse(b"s1", BAD) + SYNC, 1.0) == PROCEED
    assert take(c.to_client) == PARSE_DONE + ready()
    backend = attach(c, bind(b"s1") + execute() + SYNC)
    assert messages(take(c.to_backend)) == [b"P", b"B", b"E", b"S"]
    out = released(c, error("42601") + ready())
    assert messages(out) == [b"E", b"Z"] and error_code(out) == "42601"
    assert c.statements.get(b"s1") is None
    attach(c, bind(b"s1") + execute() + SYNC, backend)
    assert take(c.to_backend) == bind(b"s1") + execute() + SYNC  # the server's own 26000


# --- a Parse of a name already in use ------------------------------------------------------------


def test_a_parse_of_a_name_in_use_is_refused_as_postgresql_refuses_it_and_its_batch_skipped():
    c = core()
    assert c.feed_client(parse(b"s1", "select 1") + SYNC, 1.0) == PROCEED  # answered here, no backend
    assert messages(take(c.to_client)) == [b"1", b"Z"]
    # Without a backend: answered here too.
    assert c.feed_client(parse(b"s1", "select 2") + bind(b"s1") + execute() + SYNC, 2.0) == PROCEED
    out = take(c.to_client)
    assert messages(out) == [b"E", b"Z"] and error_code(out) == "42P05"
    assert b'prepared statement "s1" already exists' in out
    assert c.statements.get(b"s1").parse_rest.startswith(b"select 1") and c.counters.errors == 1
    # With a backend attached in mid-batch: the messages before it went to the server, its Sync goes too.
    backend = attach(c, bind(b"s1") + execute() + parse(b"s1", "select 3") + bind(b"s1") + execute() + SYNC)
    key = key_of("select 1")
    assert take(c.to_backend) == parse(key, "select 1") + bind(key) + execute() + SYNC
    out = released(c, PARSE_DONE + BIND_DONE + complete("SELECT 1") + ready())
    assert messages(out) == [b"2", b"C", b"E", b"Z"] and error_code(out) == "42P05"
    assert key in backend.prepared and c.statements.get(b"s1").key == key


def test_inside_a_transaction_block_a_parse_of_a_name_in_use_replaces_it():
    c = core()
    backend = in_transaction(c)
    c.feed_client(parse(b"s1", "select 1") + SYNC, 1.0)
    c.feed_backend(PARSE_DONE + ready(b"T"), 2.0)
    take(c.to_backend), take(c.to_client)
    c.feed_client(parse(b"s1", "select 2") + SYNC, 3.0)  # the known difference: PostgreSQL says 42P05
    assert take(c.to_backend) == parse(key_of("select 2"), "select 2") + SYNC
    assert c.statements.get(b"s1").key == key_of("select 2") and key_of("select 1") in backend.prepared
