"""The state scan's fast path (`plainly_stateless`) and its cache admission, without sockets.

The fast path must never skip a statement the scan would flag: it is checked against the scan itself,
on chosen texts and on generated ones.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from o7s_cluster.proxy import readback
from o7s_cluster.proxy.readback import may_change_state, plainly_stateless

_scan = readback._scan


@pytest.mark.parametrize("sql", [
    "SELECT abalance FROM pgbench_accounts WHERE aid = 12345;",
    "select 1",
    "  \n\tSELECT x FROM t;  \n\x00",
    "UPDATE pgbench_accounts SET abalance = abalance + -4 WHERE aid = 7;",
    "insert into t select * from s where id = $1",
    "DELETE FROM t WHERE id = $1",
    "VALUES 1",
    "TABLE t",
    "select 1;;  ;",
])
def test_plain_statements_skip_the_scan(sql):
    data = sql.encode()
    assert plainly_stateless(data) and plainly_stateless(bytearray(data))
    assert not _scan(data) and not may_change_state(data)


@pytest.mark.parametrize("sql, stateful", [
    ("select set_config('role', 'x', false)", True),
    ("select pg_advisory_lock(1)", True),
    ("SELECT 1; SET x=1", True),
    ("select 1;\nreset all", True),
    ("/* SELECT */ SET search_path = a", True),
    ("-- select\nset role x", True),
    ("SET work_mem = '8MB'", True),
    ('select "f"() from t', True),
    ("select 'a(b' from t", True),        # a "(" in a string: the scan decides (and errs towards a read-back)
    ("select 'a;b' from t", False),       # a ";" in a string: the scan decides
    ('select "a;b" from t', False),       # ... in a quoted identifier
    ('select "x(" from t', True),
    ("select * from t /* ; */", False),   # ... in a comment
    ("select * into temp t2 from t", True),
    ("SELECT * INTO TEMPORARY t2 FROM t", True),
    ("select x from temp_stats", False),  # "temp" in a name: the scan decides
    ("discard all", True),
    ("listen ch", True),
    ("do $$begin perform 1; end$$", True),
    ("declare c cursor with hold for select 1", True),
    ("show work_mem", False),             # not a plain DML word: scanned (and cached)
])
def test_texts_the_fast_path_leaves_to_the_scan(sql, stateful):
    data = sql.encode()
    assert not plainly_stateless(data)
    assert _scan(data) is stateful
    assert may_change_state(data) is stateful
    assert may_change_state(bytearray(data)) is stateful


_WORDS = ["select", "SELECT", "insert", "update", "delete", "with", "values", "table", "set", "reset",
          "discard", "prepare", "listen", "unlisten", "do", "load", "declare", "create", "temp", "temporary",
          "set_config", "pg_advisory_lock", "into", "from", "t", "x", "1", "$1", "'a;b'", "'('", '"q"',
          '"("', "/*", "*/", "--", "\n", " ", "\t", ";", "(", ")", ",", "=", "\x0b", "\x00", "*"]


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(_WORDS), max_size=12).map("".join))
def test_the_fast_path_never_skips_what_the_scan_flags(sql):
    data = sql.encode()
    if plainly_stateless(data):
        assert not _scan(data)
    assert may_change_state(data) is _scan(data)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=80))
def test_the_fast_path_agrees_with_the_scan_on_any_bytes(data):
    if plainly_stateless(data):
        assert not _scan(data)
    assert may_change_state(data) is _scan(data)


def test_texts_with_literals_stay_out_of_the_cache():
    readback._scan_cached.cache_clear()
    for aid in range(50):
        may_change_state(f"select f(a) from t where aid = {aid}".encode())
        may_change_state(f"select f(a) from t where name = 'n{aid}'".encode())
    assert readback._scan_cached.cache_info().currsize == 0
    may_change_state(b"select f(a) from t where aid = $1")
    may_change_state(b"select f(a) from t where aid = $1")
    info = readback._scan_cached.cache_info()
    assert info.currsize == 1 and info.hits == 1


def test_prepared_texts_are_judged_once_and_the_memory_stays_bounded(monkeypatch):
    monkeypatch.setattr(readback, "_prepared_verdicts", {})
    monkeypatch.setattr(readback, "PREPARED_VERDICTS_SIZE", 8)
    judged: list[bytes] = []
    real = readback.may_change_state
    monkeypatch.setattr(readback, "may_change_state", lambda text: judged.append(text) or real(text))
    assert readback.prepared_may_change_state(b"SET search_path = $1") is True
    assert readback.prepared_may_change_state(b"select a from t where id = $1") is False
    assert readback.prepared_may_change_state(b"select a from t where id = $1") is False
    assert readback.prepared_may_change_state(b"SET search_path = $1") is True
    assert judged == [b"SET search_path = $1", b"select a from t where id = $1"]
    for n in range(20):
        assert readback.prepared_may_change_state(f"select {n} from t".encode()) is False
        assert len(readback._prepared_verdicts) <= 8
    long_text = b"select a from t where " + b" and ".join(b"c = $1" for _ in range(200))
    assert readback.prepared_may_change_state(long_text) is False
    assert long_text not in readback._prepared_verdicts  # too long to keep
