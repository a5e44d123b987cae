"""Throwaway figures (not committed): fan-out latency and server connections, direct vs O7s."""
import asyncio, time, statistics
import asyncpg, psycopg, pytest

pytestmark = [pytest.mark.parametrize("proxy", ["transaction", "session"], indirect=True, scope="module")]
N, M = 100, 100

async def run(kw, direct_dsn, label):
    conns = [await asyncpg.connect(**kw) for _ in range(N)]
    lat = []
    got = asyncio.Queue()
    for c in conns:
        await c.add_listener("bench", lambda c_, pid, ch, p: got.put_nowait(time.perf_counter() - float(p)))
    snd = await asyncpg.connect(**kw)
    with psycopg.connect(direct_dsn, autocommit=True) as d:
        servers = d.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()").fetchone()[0]
    t0 = time.perf_counter()
    for i in range(M):
        await snd.execute(f"SELECT pg_notify('bench', '{time.perf_counter()!r}')")
        for _ in range(N):
            lat.append(await asyncio.wait_for(got.get(), 10))
    total = time.perf_counter() - t0
    lat.sort()
    print(f"\n{label}: {N} listeners x {M} notifications: server connections {servers}, "
          f"P50 {lat[len(lat)//2]*1000:.2f} ms P95 {lat[int(len(lat)*.95)]*1000:.2f} ms P99 {lat[int(len(lat)*.99)]*1000:.2f} ms, "
          f"{N*M/total:.0f} deliveries/s")
    for c in conns + [snd]:
        await c.close()

def test_bench(proxy, make_org, pool_mode):
    org = make_org("lsn_bench", "enterprise")
    kw = dict(host=proxy.host, port=proxy.port, user=org.name, password=org.password, database=org.dbname, ssl=False)
    asyncio.run(run(kw, org.backend_dsn, f"o7s {pool_mode}"))
    if pool_mode == "transaction":
        import re
        m = re.match(r"postgresql://([^:]+):([^@]+)@([^:]+):(\d+)/(.+)", org.backend_dsn)
        dkw = dict(user=m[1], password=m[2], host=m[3], port=int(m[4]), database=m[5], ssl=False)
        asyncio.run(run(dkw, org.backend_dsn, "direct"))
