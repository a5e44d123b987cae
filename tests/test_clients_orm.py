"""The client matrix, ORMs: SQLAlchemy 2 (sync on psycopg 3, async on asyncpg) in this process, and
Django's ORM (tests/clients/django_project, its own process) through a real `o7s serve` in both pool
modes: models and CRUD, transactions and savepoints, prepared statements, errors, cancels, COPY through
the driver underneath, and a pool of connections used at once."""

from __future__ import annotations

import asyncio
import io
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import exc as saexc
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

from clients.harness import RunCache, mark_known, run_workload

pytestmark = [pytest.mark.timeout(90)]
MODES = pytest.mark.parametrize("proxy", ["transaction", "session"], indirect=True, scope="module")

WORKERS = 6  # connections in the pool tests (the enterprise tier's backend pool is 50)
ROUNDS = 20  # transactions per worker
RUN_LIMIT = 60  # seconds for one async test's coroutine
CANCELLED_WITHIN = 5.0


@pytest.fixture(scope="module")
def org(make_org):
    return make_org("cl_orm", "enterprise")


class Base(DeclarativeBase):
    pass


class Team(Base):
    __tablename__ = "sa_team"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(50), unique=True)
    score: Mapped[int] = mapped_column(default=0)
    members: Mapped[list[Member]] = relationship(back_populates="team", cascade="all, delete-orphan")


class Member(Base):
    __tablename__ = "sa_member"
    id: Mapped[int] = mapped_column(primary_key=True)
    team_id: Mapped[int] = mapped_column(sa.ForeignKey("sa_team.id"))
    name: Mapped[str]
    team: Mapped[Team] = relationship(back_populates="members")


def url(proxy, org, driver: str) -> sa.URL:
    return sa.URL.create(f"postgresql+{driver}", username=org.name, password=org.password, host=proxy.host,
                         port=proxy.port, database=org.dbname)


# --------------------------------------------------------------------------- SQLAlchemy on psycopg 3


@pytest.fixture(scope="module")
def engine(proxy, org):
    eng = sa.create_engine(url(proxy, org, "psycopg"), pool_size=WORKERS, max_overflow=0, pool_timeout=20,
                           connect_args={"connect_timeout": 10, "sslmode": "disable"})
    Base.metadata.drop_all(eng)
    Base.metadata.create_all(eng)
    yield eng
    eng.dispose()


@MODES
def test_sqlalchemy_orm_crud_and_transactions(engine):
    make = sessionmaker(engine)
    with make.begin() as s:
        s.add_all([Team(name="red", members=[Member(name=f"r{i}") for i in range(5)]), Team(name="blue")])
    with make() as s:
        red = s.scalars(sa.select(Team).where(Team.name == "red")).one()
        assert sorted(m.name for m in red.members) == [f"r{i}" for i in range(5)]
        red.score = 10
        s.commit()
        red.score = 99
        s.rollback()
        assert s.get(Team, red.id).score == 10
        s.commit()
        with s.begin():
            s.add(Team(name="green"))
            nested = s.begin_nested()  # a savepoint
            s.add(Team(name="never"))
            nested.rollback()
        assert sorted(s.scalars(sa.select(Team.name))) == ["blue", "green", "red"]
        s.execute(sa.update(Team).where(Team.name == "blue").values(score=Team.score + 5))
        s.delete(s.scalars(sa.select(Team).where(Team.name == "green")).one())
        s.commit()
        assert dict(s.execute(sa.select(Team.name, Team.score).order_by(Team.name)).all()) == {"blue": 5, "red": 10}
        # Core: a bulk insert (insertmanyvalues) and a returning update.
        s.execute(sa.insert(Member), [{"team_id": red.id, "name": f"bulk{i}"} for i in range(200)])
        n = s.execute(sa.update(Member).where(Member.name.like("bulk%")).values(name="b").returning(Member.id))
        assert len(n.all()) == 200
        s.rollback()
        assert s.scalar(sa.select(sa.func.count()).select_from(Member)) == 5


@MODES
def test_sqlalchemy_prepared_statements(proxy, org):
    # psycopg prepares a statement on the server once it has run prepare_threshold times.
    eng = sa.create_engine(url(proxy, org, "psycopg"), pool_size=1,
                           connect_args={"connect_timeout": 10, "sslmode": "disable", "prepare_threshold": 1})
    try:
        with eng.connect() as c:
            q = sa.text("SELECT :a * 2 AS doubled, CAST(:b AS text) AS label")
            for i in range(10):
                assert c.execute(q, {"a": i, "b": f"x{i}"}).one() == (i * 2, f"x{i}")
            assert c.scalar(sa.text("SELECT count(*) FROM pg_prepared_statements")) >= 1
            c.commit()
            for i in range(10):  # in a fresh transaction each time: in transaction mode, any backend
                with c.begin():
                    assert c.execute(q, {"a": i, "b": "y"}).one() == (i * 2, "y")
    finally:
        eng.dispose()


@MODES
def test_sqlalchemy_error_then_usable(engine):
    with Session(engine) as s:
        s.add(Team(name="dup"))
        s.commit()
        s.add(Team(name="dup"))
        with pytest.raises(saexc.IntegrityError) as ei:
            s.commit()
        assert ei.value.orig.sqlstate == "23505"
        s.rollback()
        with pytest.raises(saexc.DataError):
            s.execute(sa.text("SELECT CAST('nope' AS int)"))
        s.rollback()
        assert s.scalar(sa.text("SELECT 'after'")) == "after"
        with pytest.raises(saexc.ProgrammingError):
            s.execute(sa.text("SELECT * FROM no_such_table"))
        s.rollback()
        assert s.scalar(sa.select(sa.func.count()).select_from(Team).where(Team.name == "dup")) == 1


@MODES
def test_sqlalchemy_cancel(proxy, org, engine):
    # statement_timeout given as a startup option: it must hold on every backend the session uses.
    eng = sa.create_engine(url(proxy, org, "psycopg"), pool_size=1, connect_args={
        "connect_timeout": 10, "sslmode": "disable", "options": "-c statement_timeout=1000"})
    try:
        with eng.connect() as c:
            for _ in range(3):
                t0 = time.monotonic()
                with pytest.raises(saexc.OperationalError) as ei:
                    c.execute(sa.text("SELECT pg_sleep(5)"))
                assert ei.value.orig.sqlstate == "57014"
                assert time.monotonic() - t0 < CANCELLED_WITHIN
                c.rollback()
            assert c.scalar(sa.text("SHOW statement_timeout")) == "1s"
    finally:
        eng.dispose()
    # The driver's cancel from another thread, on a pooled connection.
    with engine.connect() as c:
        raw = c.connection.driver_connection
        with ThreadPoolExecutor(1) as ex:
            fut = ex.submit(lambda: (time.sleep(0.5), raw.cancel_safe(timeout=5)))
            with pytest.raises(saexc.OperationalError) as ei:
                c.execute(sa.text("SELECT pg_sleep(10)"))
            fut.result(10)
        assert ei.value.orig.sqlstate == "57014"
        c.rollback()
        assert c.scalar(sa.text("SELECT 1")) == 1


@MODES
def test_sqlalchemy_copy_through_the_driver(engine):
    with Session(engine) as s:
        team = Team(name="copied")
        s.add(team)
        s.commit()
        tid = team.id
    raw = engine.raw_connection()
    try:
        cur = raw.driver_connection.cursor()
        with cur.copy("COPY sa_member (team_id, name) FROM STDIN") as copy:
            for i in range(300):
                copy.write_row((tid, f"c{i}"))
        raw.commit()
        out = io.BytesIO()
        with cur.copy(f"COPY (SELECT name FROM sa_member WHERE team_id = {tid} ORDER BY id) TO STDOUT") as copy:
            for chunk in copy:
                out.write(chunk)
        raw.commit()
        assert out.getvalue().decode().split() == [f"c{i}" for i in range(300)]
    finally:
        raw.close()


@MODES
def test_sqlalchemy_pool_concurrent(engine):
    with Session(engine) as s:
        s.add_all([Team(name=f"w{w}") for w in range(WORKERS)])
        s.commit()
    make = sessionmaker(engine)

    def work(w: int) -> int:
        for _ in range(ROUNDS):
            with make.begin() as s:
                t = s.scalars(sa.select(Team).where(Team.name == f"w{w}").with_for_update()).one()
                t.score += 1
        with make() as s:
            return s.scalar(sa.select(Team.score).where(Team.name == f"w{w}"))

    with ThreadPoolExecutor(WORKERS) as ex:
        assert list(ex.map(work, range(WORKERS), timeout=60)) == [ROUNDS] * WORKERS
    assert engine.pool.checkedout() == 0


# ------------------------------------------------------------------------- SQLAlchemy on asyncpg


async def _async_engine(proxy, org, **connect_args):
    eng = create_async_engine(url(proxy, org, "asyncpg"), pool_size=WORKERS, max_overflow=0, pool_timeout=20,
                              connect_args={"timeout": 10, "ssl": False, **connect_args})
    return eng


@MODES
def test_sqlalchemy_async_workload(proxy, org, pool_mode):
    """AsyncSession on asyncpg: asyncpg prepares every statement under its own name (the pattern that
    breaks behind transaction poolers without prepared-statement support)."""

    async def body():
        eng = await _async_engine(proxy, org)
        try:
            async with eng.begin() as c:
                await c.run_sync(Base.metadata.drop_all)
                await c.run_sync(Base.metadata.create_all)
            make = async_sessionmaker(eng, expire_on_commit=False)
            async with make.begin() as s:
                s.add_all([Team(name=f"a{w}") for w in range(WORKERS)])
            async with make() as s:
                for i in range(20):  # the same statement many times: asyncpg's statement cache
                    assert (await s.execute(sa.select(Team.name).where(Team.id > i - 1000).limit(1))).scalar()
                async with s.begin_nested():
                    s.add(Team(name="nested"))
                await s.commit()
                s.add(Team(name="a0"))
                with pytest.raises(saexc.IntegrityError):
                    await s.commit()
                await s.rollback()
                assert await s.scalar(sa.select(sa.func.count()).select_from(Team)) == WORKERS + 1
                await s.execute(sa.delete(Team).where(Team.name == "nested"))
                await s.rollback()
                assert await s.scalar(sa.select(sa.func.count()).select_from(Team)) == WORKERS + 1

            async def work(w: int) -> int:
                for _ in range(ROUNDS):
                    async with make.begin() as s:
                        await s.execute(sa.update(Team).where(Team.name == f"a{w}").values(score=Team.score + 1))
                async with make() as s:
                    return await s.scalar(sa.select(Team.score).where(Team.name == f"a{w}"))

            assert await asyncio.gather(*(work(w) for w in range(WORKERS))) == [ROUNDS] * WORKERS
            # COPY through asyncpg underneath.
            async with eng.connect() as c:
                raw = (await c.get_raw_connection()).driver_connection
                tid = await raw.fetchval("SELECT id FROM sa_team WHERE name = 'a0'")
                await raw.copy_records_to_table("sa_member", records=[(i + 10_000, tid, f"m{i}") for i in range(100)],
                                                columns=["id", "team_id", "name"])
                assert await c.scalar(sa.text(f"SELECT count(*) FROM sa_member WHERE team_id = {tid}")) == 100
        finally:
            await eng.dispose()

    asyncio.run(asyncio.wait_for(body(), RUN_LIMIT))


@MODES
def test_sqlalchemy_async_cancel(proxy, org):
    async def body():
        # asyncpg's command_timeout: a CancelRequest after 0.5 s, then the connection goes on.
        eng = await _async_engine(proxy, org, command_timeout=0.5)
        try:
            async with eng.connect() as c:
                t0 = time.monotonic()
                with pytest.raises((saexc.DBAPIError, asyncio.TimeoutError, TimeoutError)):
                    await c.execute(sa.text("SELECT pg_sleep(10)"))
                assert time.monotonic() - t0 < CANCELLED_WITHIN
                await c.rollback()
                assert await c.scalar(sa.text("SELECT 'after cancel'")) == "after cancel"
        finally:
            await eng.dispose()
        eng = await _async_engine(proxy, org, server_settings={"statement_timeout": "1000"})
        try:
            async with eng.connect() as c:
                with pytest.raises(saexc.DBAPIError) as ei:
                    await c.execute(sa.text("SELECT pg_sleep(5)"))
                assert ei.value.orig.sqlstate == "57014"
                await c.rollback()
                assert await c.scalar(sa.text("SELECT 1")) == 1
        finally:
            await eng.dispose()

    asyncio.run(asyncio.wait_for(body(), RUN_LIMIT))


# ------------------------------------------------------------------------------------------- Django

DJANGO = Path(__file__).parent / "clients" / "django_project"
DJANGO_STEPS = ["migrate", "crud", "transactions", "error_then_usable", "cancel", "prepared_statements", "copy",
                "pool_threads"]
_django_runs = RunCache()


DJANGO_KNOWN: dict[tuple[str | None, str], str] = {}  # (mode or None, step) -> the O7s defect it meets


@MODES
@pytest.mark.timeout(180)
@pytest.mark.parametrize("step", DJANGO_STEPS)
def test_django(proxy, org, step, request):
    mark_known(request, step, DJANGO_KNOWN)
    run = _django_runs.get(proxy, lambda: run_workload([sys.executable, str(DJANGO / "workload.py")], proxy, org,
                                                       timeout=150, cwd=DJANGO,
                                                       env={"PYTHONDONTWRITEBYTECODE": "1"}))
    run.check(step)
