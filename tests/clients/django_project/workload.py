"""Django's ORM through a real `o7s serve`: migrate (back to zero and forward), CRUD, transactions,
errors, a cancel, prepared statements and a connection pool used from several threads. Run by
tests/test_clients_django.py in its own process (Django's settings are per process); prints one
RESULT line per step (tests/clients/harness.py)."""

from __future__ import annotations

import io
import os
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "matrix_settings")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import django  # noqa: E402

django.setup()

from django.core.management import call_command  # noqa: E402
from django.db import DatabaseError, IntegrityError, OperationalError, connection, connections, transaction  # noqa: E402
from django.db.models import Count, F, Sum  # noqa: E402
from matrix_app.models import Author, Book  # noqa: E402

THREADS = 6  # threads sharing the pooled alias at once (its pool's max_size is 8)
ROUNDS = 15  # transactions per thread
CANCEL_AFTER = 0.5  # seconds into a pg_sleep(10) before it is cancelled
CANCELLED_WITHIN = 5.0


def check(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(what)


def step_migrate() -> None:
    call_command("migrate", "matrix_app", "zero", verbosity=0, interactive=False)
    check("matrix_app_book" not in connection.introspection.table_names(), "migrate zero left the table")
    call_command("migrate", verbosity=0, interactive=False)
    tables = connection.introspection.table_names()
    check({"matrix_app_author", "matrix_app_book", "django_migrations"} <= set(tables), f"tables: {tables}")
    call_command("migrate", verbosity=0, interactive=False)  # nothing left to apply: a no-op


def step_crud() -> None:
    Book.objects.all().delete()
    Author.objects.all().delete()
    ann = Author.objects.create(name="Ann")
    bob = Author.objects.create(name="Bob")
    Book.objects.bulk_create([Book(author=ann, title=f"A{i}", pages=10 + i, data={"i": i}) for i in range(20)]
                             + [Book(author=bob, title="B0", pages=5)])
    check(Book.objects.filter(author__name="Ann").count() == 20, "filter through the foreign key")
    check(Book.objects.get(title="A3").data == {"i": 3}, "JSON field round trip")
    Book.objects.filter(author=ann).update(pages=F("pages") + 1)
    check(Book.objects.aggregate(s=Sum("pages"))["s"] == sum(11 + i for i in range(20)) + 5, "update with F")
    counts = dict(Author.objects.annotate(n=Count("books")).values_list("name", "n"))
    check(counts == {"Ann": 20, "Bob": 1}, f"annotate: {counts}")
    b = Book.objects.get(title="B0")
    b.title = "B-renamed"
    b.save()
    check(Book.objects.filter(title="B-renamed").exists(), "save")
    bob.delete()  # cascades to the book
    check(not Book.objects.filter(title="B-renamed").exists(), "cascade delete")
    check([x.title for x in Book.objects.filter(data__i__gte=18).order_by("title")] == ["A18", "A19"], "JSON lookup")


def step_transactions() -> None:
    Author.objects.filter(name__startswith="tx-").delete()
    committed = []
    with transaction.atomic():
        Author.objects.create(name="tx-kept")
        transaction.on_commit(lambda: committed.append(True))
        with transaction.atomic():  # a savepoint
            Author.objects.create(name="tx-savepoint")
        try:
            with transaction.atomic():
                Author.objects.create(name="tx-inner")
                raise RuntimeError("roll the savepoint back")
        except RuntimeError:
            pass
    check(committed == [True], "on_commit ran after the commit")
    try:
        with transaction.atomic():
            Author.objects.create(name="tx-dropped")
            raise RuntimeError("roll back")
    except RuntimeError:
        pass
    with transaction.atomic():
        Author.objects.create(name="tx-set-rollback")
        transaction.set_rollback(True)
    # select_for_update holds row locks until the transaction ends.
    with transaction.atomic():
        a = Author.objects.select_for_update().get(name="tx-kept")
        a.name = "tx-kept-locked"
        a.save()
    names = sorted(Author.objects.filter(name__startswith="tx-").values_list("name", flat=True))
    check(names == ["tx-kept-locked", "tx-savepoint"], f"after the transactions: {names}")


def step_error_then_usable() -> None:
    Author.objects.get_or_create(name="unique-one")
    try:
        with transaction.atomic():
            Author.objects.create(name="unique-one")
        raise AssertionError("a duplicate name was accepted")
    except IntegrityError:
        pass
    try:  # a check constraint
        Book.objects.create(author=Author.objects.get(name="unique-one"), title="bad", pages=0)
        raise AssertionError("pages=0 was accepted")
    except IntegrityError:
        pass
    with connection.cursor() as c:
        try:
            c.execute("SELECT 1 / 0")
            raise AssertionError("1 / 0 gave no error")
        except DatabaseError as e:
            check(getattr(e.__cause__, "sqlstate", None) == "22012", f"sqlstate of {e!r}")
        c.execute("SELECT 'after'")
        check(c.fetchone() == ("after",), "usable after the error")
    # An error inside atomic marks the block for rollback; the connection works after it.
    try:
        with transaction.atomic():
            Author.objects.create(name="in-failed-block")
            with connection.cursor() as c:
                c.execute("SELECT * FROM no_such_table")
    except DatabaseError:
        pass
    check(not Author.objects.filter(name="in-failed-block").exists(), "the failed block was rolled back")


def step_cancel() -> None:
    # A statement timeout for one transaction.
    try:
        with transaction.atomic(), connection.cursor() as c:
            c.execute("SET LOCAL statement_timeout = '200ms'")
            c.execute("SELECT pg_sleep(5)")
        raise AssertionError("the statement timeout did not fire")
    except OperationalError as e:
        check(getattr(e.__cause__, "sqlstate", None) == "57014", f"sqlstate of {e!r}")
    # psycopg's cancel from another thread, on the connection Django holds.
    connection.ensure_connection()
    raw = connection.connection
    timer = threading.Timer(CANCEL_AFTER, lambda: raw.cancel_safe(timeout=5))
    timer.start()
    t0 = time.monotonic()
    try:
        with connection.cursor() as c:
            c.execute("SELECT pg_sleep(10)")
        raise AssertionError("the cancel did not stop the query")
    except OperationalError as e:
        check(getattr(e.__cause__, "sqlstate", None) == "57014", f"sqlstate of {e!r}")
    finally:
        timer.join()
    check(time.monotonic() - t0 < CANCELLED_WITHIN, "the cancel took too long")
    check(Author.objects.filter(name="unique-one").exists(), "usable after the cancel")


def step_prepared_statements() -> None:
    db = connections["bound"]
    a = Author.objects.using("bound").get_or_create(name="prepared")[0]
    for i in range(15):
        Book.objects.using("bound").create(author=a, title=f"p{i}", pages=i + 1)
        check(Book.objects.using("bound").filter(author=a, pages__lte=i + 1).count() == i + 1, "count")
    db.ensure_connection()
    check(db.connection.prepare_threshold == 0, "the bound alias prepares every statement")
    with db.cursor() as c:
        c.execute("SELECT count(*) FROM pg_prepared_statements")
        check(c.fetchone()[0] >= 1, "nothing prepared on the server")
    with transaction.atomic(using="bound"):
        Book.objects.using("bound").filter(author=a).update(pages=F("pages") * 2)
    check(Book.objects.using("bound").filter(author=a).aggregate(s=Sum("pages"))["s"] == 2 * sum(range(1, 16)), "sum")


def step_copy() -> None:
    a = Author.objects.get_or_create(name="copied")[0]
    Book.objects.filter(author=a).delete()
    data = "".join(f"{a.pk}\tc{i}\t{i + 1}\t{{}}\n" for i in range(500))
    with transaction.atomic(), connection.cursor() as c:  # Django's cursor wraps psycopg's, which has COPY
        with c.cursor.copy("COPY matrix_app_book (author_id, title, pages, data) FROM STDIN") as copy:
            copy.write(data)
    check(Book.objects.filter(author=a).count() == 500, "rows copied in")
    out = io.StringIO()
    with connection.cursor() as c:
        with c.cursor.copy(f"COPY (SELECT title FROM matrix_app_book WHERE author_id = {a.pk} ORDER BY pages) "
                           "TO STDOUT") as copy:
            for chunk in copy:
                out.write(bytes(chunk).decode())
    check(out.getvalue().split() == [f"c{i}" for i in range(500)], "rows copied out")


def step_pool_threads() -> None:
    Author.objects.filter(name__startswith="w-").delete()
    Author.objects.bulk_create([Author(name=f"w-{i}") for i in range(THREADS)])

    def work(i: int) -> int:
        try:
            for _ in range(ROUNDS):
                with transaction.atomic(using="pooled"):
                    a = Author.objects.using("pooled").select_for_update().get(name=f"w-{i}")
                    Book.objects.using("pooled").create(author=a, title="w", pages=1)
            return Book.objects.using("pooled").filter(author__name=f"w-{i}").count()
        finally:
            connections.close_all()  # give this thread's connection back to the pool

    with ThreadPoolExecutor(THREADS) as ex:
        counts = list(ex.map(work, range(THREADS), timeout=60))
    check(counts == [ROUNDS] * THREADS, f"per-thread counts {counts}")


STEPS = [
    ("migrate", step_migrate),
    ("crud", step_crud),
    ("transactions", step_transactions),
    ("error_then_usable", step_error_then_usable),
    ("cancel", step_cancel),
    ("prepared_statements", step_prepared_statements),
    ("copy", step_copy),
    ("pool_threads", step_pool_threads),
]


def main() -> None:
    wanted = set(sys.argv[1:])
    for name, fn in STEPS:
        if wanted and name not in wanted:
            continue
        try:
            fn()
            print(f"RESULT\t{name}\tok", flush=True)
        except Exception as e:  # noqa: BLE001 - every failure is reported, then the next step runs
            detail = f"{type(e).__name__}: {e} | " + traceback.format_exc(limit=6).replace("\n", " | ")
            print(f"RESULT\t{name}\tfail\t{detail}", flush=True)
        finally:
            connections.close_all()  # every step starts on fresh connections
    connections["pooled"].close_pool()


if __name__ == "__main__":
    main()
