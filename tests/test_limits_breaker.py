"""The login circuit breaker: the sans-IO state machine on a hand-held clock, then its Redis sharing
between workers (real redis-server), then through a real `o7s serve` (tripping, lifting, scope, no oracle)."""

from __future__ import annotations

import time

import psycopg
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from conftest import RawPG, first_error, free_port, start_proxy, stop_proxy
from o7s_cluster.config import ConfigError, Settings, load_settings
from o7s_cluster.limits.service import Limits
from o7s_cluster.limits.breaker import MAX_KEY_ORG, BreakerPolicy, LoginBreaker

POLICY = BreakerPolicy(failures_max=10, window=150.0, block=120.0)


def fail(b: LoginBreaker, n: int, org: str = "acme", addr: str = "10.0.0.1", t0: float = 0.0, step: float = 1.0):
    trips = [b.failure(org, addr, t0 + i * step) for i in range(n)]
    return [t for t in trips if t is not None]


# ---------------------------------------------------------------------------------------------- state machine


def test_tenth_failure_within_the_window_trips_and_blocks_for_120_s() -> None:
    b = LoginBreaker(POLICY)
    assert fail(b, 9) == [] and b.blocked_for("acme", "10.0.0.1", 9.0) == 0.0
    trip = b.failure("acme", "10.0.0.1", 9.0)
    assert trip is not None and (trip.org, trip.address, trip.failures, trip.until) == ("acme", "10.0.0.1", 10, 129.0)
    assert b.blocked_for("acme", "10.0.0.1", 9.0) == 120.0
    assert b.blocked_for("acme", "10.0.0.1", 128.5) == pytest.approx(0.5)
    assert b.blocked_for("acme", "10.0.0.1", 129.0) == 0.0  # lifted
    # After the block the count starts again: one more failure does not trip it again.
    assert b.failure("acme", "10.0.0.1", 130.0) is None and b.blocked_for("acme", "10.0.0.1", 130.0) == 0.0


def test_failures_spread_over_more_than_the_window_never_trip() -> None:
    b = LoginBreaker(POLICY)
    # One failure every 16.7 s: at most 9 of them within any 150 s.
    assert fail(b, 100, step=150.0 / 9 + 0.01) == []
    # 10 within 150 s (just): trips.
    b = LoginBreaker(POLICY)
    assert len(fail(b, 10, step=149.0 / 9)) == 1


def test_other_orgs_and_other_addresses_are_unaffected() -> None:
    b = LoginBreaker(POLICY)
    assert len(fail(b, 10)) == 1
    assert b.blocked_for("acme", "10.0.0.1", 10.0) > 0
    assert b.blocked_for("globex", "10.0.0.1", 10.0) == 0.0
    assert b.blocked_for("acme", "10.0.0.2", 10.0) == 0.0
    assert b.blocked_for("acme", "::1", 10.0) == 0.0


def test_refused_logins_during_a_block_are_not_counted_and_do_not_extend_it() -> None:
    b = LoginBreaker(POLICY)
    trip = fail(b, 10)[0]
    for t in range(10, 120):
        assert b.failure("acme", "10.0.0.1", float(t)) is None
    assert b.blocked_for("acme", "10.0.0.1", 128.0) == pytest.approx(trip.until - 128.0)
    assert b.blocked_for("acme", "10.0.0.1", trip.until) == 0.0


def test_a_success_does_not_reset_anything() -> None:
    # There is no "success" input at all: a guessed password must neither lift a block nor buy more guesses.
    assert not any(name for name in dir(LoginBreaker) if "success" in name or "reset" in name)


def test_unknown_org_names_are_keys_like_any_other() -> None:
    b = LoginBreaker(POLICY)
    long_name = "x" * 5000
    assert len(fail(b, 10, org=long_name)) == 1
    assert b.blocked_for("x" * MAX_KEY_ORG, "10.0.0.1", 10.0) > 0  # capped: one key however long the name


def test_impose_honours_a_block_from_elsewhere() -> None:
    b = LoginBreaker(POLICY)
    fail(b, 5)
    b.impose("acme", "10.0.0.1", 100.0, now=5.0)
    assert b.blocked_for("acme", "10.0.0.1", 50.0) == 50.0
    assert b.blocked_for("acme", "10.0.0.1", 100.0) == 0.0
    assert b.failure("acme", "10.0.0.1", 100.0) is None  # the count restarted with the block
    b.impose("acme", "10.0.0.1", 1.0, now=5.0)  # already over: nothing
    assert b.blocked_for("acme", "10.0.0.1", 101.0) == 0.0


def test_disabled() -> None:
    b = LoginBreaker(BreakerPolicy(failures_max=0))
    assert fail(b, 1000) == [] and b.blocked_for("acme", "10.0.0.1", 1000.0) == 0.0 and len(b) == 0


def test_the_table_is_bounded_and_keeps_blocks_first() -> None:
    b = LoginBreaker(POLICY, max_keys=100)
    assert len(fail(b, 10, org="victim-of-a-guesser")) == 1
    for i in range(10_000):  # a client spraying org names from many addresses
        b.failure(f"org{i}", f"10.1.{i // 250}.{i % 250}", 10.0 + i * 0.001)
    assert len(b) == 100
    assert b.blocked_for("victim-of-a-guesser", "10.0.0.1", 30.0) > 0


class _Model:
    """The rule, written as plainly as possible: failures are kept for ever, a key is blocked for `block` s from
    the failure that makes `failures_max` unblocked failures within `window` since the last block."""

    def __init__(self, p: BreakerPolicy) -> None:
        self.p = p
        self.fails: dict[tuple[str, str], list[float]] = {}
        self.until: dict[tuple[str, str], float] = {}

    def failure(self, k: tuple[str, str], now: float) -> bool:
        if self.until.get(k, 0.0) > now:
            return False
        recent = [t for t in self.fails.get(k, []) if t > now - self.p.window] + [now]
        if len(recent) >= self.p.failures_max:
            self.fails[k] = []
            self.until[k] = now + self.p.block
            return True
        self.fails[k] = recent
        return False


@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.sampled_from(["1", "2"]),
                          st.floats(min_value=0, max_value=60)), max_size=200))
def test_matches_a_plain_model(events) -> None:
    p = BreakerPolicy(failures_max=3, window=20.0, block=30.0)
    b, model, now = LoginBreaker(p), _Model(p), 0.0
    for org, addr, dt in events:
        now += dt
        assert (b.failure(org, addr, now) is not None) == model.failure((org, addr), now)
        for k in [("a", "1"), ("a", "2"), ("b", "1"), ("b", "2")]:
            assert (b.blocked_for(*k, now) > 0) == (model.until.get(k, 0.0) > now)


def test_settings() -> None:
    s = load_settings(env={})
    assert (s.auth_breaker_failures, s.auth_breaker_window, s.auth_breaker_block) == (10, 150.0, 120.0)
    s = load_settings(env={"O7S_AUTH_BREAKER_FAILURES": "5", "O7S_AUTH_BREAKER_WINDOW": "1m",
                           "O7S_AUTH_BREAKER_BLOCK": "500ms"})
    assert (s.auth_breaker_failures, s.auth_breaker_window, s.auth_breaker_block) == (5, 60.0, 0.5)
    assert load_settings(env={"O7S_AUTH_BREAKER_FAILURES": "0"}).auth_breaker_failures == 0
    with pytest.raises(ConfigError):
        load_settings(env={"O7S_AUTH_BREAKER_FAILURES": "1001"})
    with pytest.raises(ConfigError):
        load_settings(env={"O7S_AUTH_BREAKER_BLOCK": "0"})


# ---------------------------------------------------------------------------------------------- shared through Redis


async def test_workers_sharing_redis_count_together_and_honour_each_others_blocks(redis_server) -> None:
    s = Settings(redis_url=redis_server.url, auth_breaker_failures=10, auth_breaker_window=150.0,
                 auth_breaker_block=2.0)
    workers = [Limits(s, worker_key=f"m{i}-w0-1") for i in range(2)]  # e.g. two machines
    async with trio.open_nursery() as n:
        for lim in workers:
            await n.start(lim.run)
        a, b = (w.logins for w in workers)
        trips = []
        for i in range(10):  # 5 failures on each: neither would trip alone
            trips.append(await (a, b)[i % 2].failed("acme", "10.0.0.9"))
        assert [t is not None for t in trips] == [False] * 9 + [True]
        assert trips[-1].failures == 10
        # The other worker learns of the block before any SCRAM work, from Redis.
        assert 1.0 < await a.blocked_for("acme", "10.0.0.9") <= 2.0
        assert 1.0 < await b.blocked_for("acme", "10.0.0.9") <= 2.0
        assert await a.blocked_for("acme", "10.0.0.8") == 0.0
        assert await b.blocked_for("globex", "10.0.0.9") == 0.0
        await trio.sleep(2.1)
        assert await a.blocked_for("acme", "10.0.0.9") == 0.0
        assert await b.blocked_for("acme", "10.0.0.9") == 0.0
        # Redis gone: each worker still enforces the limit alone.
        redis_server.stop()
        for w in workers:
            w._set_degraded(OSError("test: Redis stopped"))
        trips = [await a.failed("initech", "10.0.0.9") for _ in range(10)]
        assert trips[-1] is not None and await a.blocked_for("initech", "10.0.0.9") > 0
        n.cancel_scope.cancel()


# ---------------------------------------------------------------------------------------------- through o7s serve


@pytest.fixture(scope="module")
def breaker_proxy(migrated, tmp_path_factory):
    # A short block so the test sees it lift; the default limit (10 within 150 s).
    p = start_proxy(dict(migrated, O7S_AUTH_BREAKER_BLOCK="4"), tmp_path_factory.mktemp("breaker"),
                    "--workers", "2", "--admin", f"127.0.0.1:{(admin := free_port())}")
    p.admin = f"http://127.0.0.1:{admin}"  # type: ignore[attr-defined]
    yield p
    stop_proxy(p)


class _From(RawPG):
    """A raw client from another loopback address (127.0.0.0/8 is all ours on Linux)."""

    def __init__(self, host: str, port: int, source: str) -> None:
        import socket

        self.sock = socket.create_connection((host, port), timeout=10, source_address=(source, 0))


def _login(proxy, user: str, password: str, dbname: str, source: str | None = None) -> dict[str, str] | None:
    with (RawPG(proxy.host, proxy.port) if source is None else _From(proxy.host, proxy.port, source)) as raw:
        return first_error(raw.login(user, password, dbname))


def _attempts_per_second(proxy, org, n: int) -> tuple[float, list[str]]:
    t0 = time.perf_counter()
    codes = [(_login(proxy, org.name, "wrong-password", org.dbname) or {}).get("C", "ok") for _ in range(n)]
    return n / (time.perf_counter() - t0), codes


def _metric(admin: str, name: str) -> float:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{admin}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def test_breaker_trips_refuses_at_once_and_lifts(breaker_proxy, make_org):
    org = make_org("brk_a", "pro")
    other = make_org("brk_b", "pro")
    rate_before, codes = _attempts_per_second(breaker_proxy, org, 10)
    assert codes == ["28P01"] * 10
    t_block = time.monotonic()
    rate_after, codes = _attempts_per_second(breaker_proxy, org, 50)
    assert codes == ["08004"] * 50
    print(f"\nwrong passwords: {rate_before:.0f} attempts/s with SCRAM, {rate_after:.0f}/s refused by the breaker")
    err = _login(breaker_proxy, org.name, org.password, org.dbname)  # the right password does not lift it
    assert err is not None and err["C"] == "08004" and err["S"] == "FATAL"
    assert "too many failed logins" in err["M"] and "10 within 150 s" in err["M"] and "4 s" in err["M"]
    assert err["H"].startswith("Retry after ") and "UTC" in err["H"]
    # The same org from another address is not affected, nor another org from the same address.
    assert _login(breaker_proxy, org.name, org.password, org.dbname, source="127.0.0.2") is None
    with psycopg.connect(breaker_proxy.dsn(other), autocommit=True) as c:
        assert c.execute("select 1").fetchone() == (1,)
    assert _metric(breaker_proxy.admin, "o7s_login_blocks_total") >= 1
    assert _metric(breaker_proxy.admin, "o7s_logins_blocked_total") >= 51
    # The block lifts after its 4 s, and the right password works again.
    while _login(breaker_proxy, org.name, org.password, org.dbname) is not None:
        assert time.monotonic() - t_block < 10, "the block did not lift"
        time.sleep(0.2)
    assert time.monotonic() - t_block >= 3.5
    assert "login breaker tripped" in breaker_proxy.log.read_text()


def test_unknown_org_is_treated_exactly_like_a_known_one(breaker_proxy, make_org):
    known = make_org("brk_known", "pro")
    seen = {}
    for name, password, db in [("brk_known", "wrong", known.dbname), ("brk_nosuch", "wrong", "brk_nosuch_db")]:
        codes, messages = [], []
        for _ in range(12):
            err = _login(breaker_proxy, name, password, db) or {}
            codes.append(err.get("C"))
            messages.append(err.get("M", "").replace(name, "ORG"))
        seen[name] = (codes, messages)
    assert seen["brk_known"] == seen["brk_nosuch"]
    assert seen["brk_known"][0] == ["28P01"] * 10 + ["08004"] * 2
