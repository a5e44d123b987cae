"""Sessions queued for a busy pool are granted a backend in the giver's task (`net.grant`): through
`o7s serve`, many clients over a pool of 3, with and without settings of their own, plain and pipelined."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import psycopg
import pytest

from conftest import extra_tier

CLIENTS = 12
ROUNDS = 60
SMALL = ("grant-small", 89, 50, 100000, 1, 3, 20000, 120000, "4MB", False, 0, 0, 0, 0, 0)  # a pool of 3


@pytest.fixture(scope="module")
def small(migrated) -> Iterator[str]:
    with extra_tier(migrated, SMALL) as name:
        yield name


def test_many_clients_over_a_small_pool_keep_their_own_settings_and_answers(proxy, make_org, small):
    org = make_org("grant_many", small)
    failures: list[str] = []

    def client(i: int) -> None:
        try:
            with psycopg.connect(proxy.dsn(org), autocommit=True, connect_timeout=20) as conn:
                own = i % 2 == 0  # half set a setting (the grant must apply it first), half use the defaults
                if own:
                    conn.execute(f"SET application_name = 'grant{i}'")
                want = f"grant{i}" if own else conn.execute("SHOW application_name").fetchone()[0]
                for n in range(ROUNDS):
                    if n % 10 == 9:  # several queries in one batch, queued as one
                        with conn.pipeline():
                            curs = [conn.execute("SELECT %s::int, current_setting('application_name')", (n * 100 + k,))
                                    for k in range(3)]
                        got = [c.fetchone() for c in curs]
                        assert got == [(n * 100 + k, want) for k in range(3)], got
                    else:
                        got = conn.execute(f"SELECT {i} * 1000 + {n}, current_setting('application_name')").fetchone()
                        assert got == (i * 1000 + n, want), (i, n, got)
        except Exception as exc:  # noqa: BLE001 - reported below, with the client's number
            failures.append(f"client {i}: {exc!r}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures
    assert not any(t.is_alive() for t in threads)
