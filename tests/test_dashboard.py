"""The live dashboard (/dashboard on the admin port) in a real headless browser: Debian's chromium driven by
Playwright (the system binary, no browser download), against a real `o7s serve` with two workers and orgs
this test creates and queries through the proxy.

Checked: the page and its JSON are refused without the admin token; the login form and the ?token= bookmark
both set the session cookie; the cookie opens reads but never changes, and rotating the token (SIGHUP) ends
it; the page shows the test's orgs with their tier, live connections against the tier's ceiling, query counts
and invoice so far; the figures move while the test runs queries, without a reload; its logins appear among
the recent audit events; a screenshot is saved (its path is printed).
"""

from __future__ import annotations

import re
import shutil
import threading
import time
from collections.abc import Iterator

import httpx
import psycopg
import pytest

from conftest import Org, Proxy, free_port, start_proxy, stop_proxy

TOKEN = "dashboard-admin-token-0123456789"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def orgs(make_org) -> dict[str, Org]:
    return {"dash_pro": make_org("dash_pro", "pro"), "dash_starter": make_org("dash_starter", "starter")}


@pytest.fixture(scope="module")
def served(migrated, orgs, tmp_path_factory) -> Iterator[tuple[Proxy, str]]:
    tmp = tmp_path_factory.mktemp("dashboard")
    admin = free_port()
    env = {k: v for k, v in migrated.items() if k != "O7S_ADMIN_TOKEN"}
    env.update(O7S_ADMIN_TOKEN=TOKEN, O7S_USAGE_WINDOW="0.5")
    p = start_proxy(env, tmp, "--workers", "2", "--admin", f"127.0.0.1:{admin}")
    url = f"http://127.0.0.1:{admin}"
    try:
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/ready", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "o7s serve did not get ready"
            time.sleep(0.1)
        yield p, url
    finally:
        stop_proxy(p)


def run_queries(proxy: Proxy, org: Org, n: int) -> None:
    with psycopg.connect(proxy.dsn(org), autocommit=True, connect_timeout=10) as conn:
        for _ in range(n):
            conn.execute("SELECT 1").fetchall()


def test_dashboard_and_its_reads_need_the_token(served) -> None:
    _, url = served
    r = httpx.get(f"{url}/dashboard", timeout=10)
    assert r.status_code == 401 and 'name="token"' in r.text and "o7s_admin" not in r.headers.get("set-cookie", "")
    for path in ("/v1/dashboard/account", "/v1/dashboard/audit"):
        assert httpx.get(f"{url}{path}", timeout=10).status_code == 401  # even though other reads are open
        assert httpx.get(f"{url}{path}", headers={"authorization": f"Bearer {TOKEN}"}, timeout=10).status_code == 200
    wrong = httpx.get(f"{url}/dashboard", params={"token": "not-the-token-0123456789"}, timeout=10)
    assert wrong.status_code == 401 and "not the admin token" in wrong.text
    # The static files hold no data and load without a token; nothing is fetched from elsewhere.
    js = httpx.get(f"{url}/dashboard/app.js", timeout=10)
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    page = httpx.get(f"{url}/dashboard", headers={"authorization": f"Bearer {TOKEN}"}, timeout=10).text
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page + js.text)

    # The login form sets a cookie (not the token); the cookie opens reads and never a change.
    with httpx.Client(base_url=url, timeout=10) as c:
        r = c.post("/dashboard/login", data={"token": TOKEN})
        assert r.status_code == 303 and r.headers["location"] == "/dashboard"
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
        assert c.get("/dashboard").status_code == 200
        assert c.get("/v1/dashboard/account").status_code == 200
        assert c.post("/v1/workers", json={"count": 3}).status_code == 401
    with httpx.Client(base_url=url, timeout=10, cookies={"o7s_admin": "0" * 64}) as c:
        assert c.get("/v1/dashboard/account").status_code == 401


def test_dashboard_in_a_browser_shows_live_figures(served, orgs, platform_dsn, tmp_path) -> None:
    from playwright.sync_api import expect, sync_playwright

    proxy, url = served
    pro, starter = orgs["dash_pro"], orgs["dash_starter"]
    run_queries(proxy, pro, 20)
    run_queries(proxy, starter, 7)
    held = psycopg.connect(proxy.dsn(pro), autocommit=True, connect_timeout=10)  # a live connection to show
    held.execute("SELECT 1")
    stop = threading.Event()

    def busy() -> None:  # queries while the page is watched
        with psycopg.connect(proxy.dsn(pro), autocommit=True, connect_timeout=10) as conn:
            while not stop.is_set():
                conn.execute("SELECT 1")
                time.sleep(0.01)

    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                         args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{url}/dashboard")
            expect(page.locator("#login")).to_be_visible()  # no cookie yet: the login form
            page.fill("#token", "not-the-token-0123456789")
            page.click("button[type=submit]")
            expect(page.locator("#message")).to_contain_text("not the admin token")
            page.fill("#token", TOKEN)
            page.click("button[type=submit]")
            page.wait_for_url(f"{url}/dashboard")

            row = page.locator('#orgs tr[data-org="dash_pro"]')
            expect(row.locator("td.tier")).to_have_text("pro", timeout=15000)
            expect(page.locator('#orgs tr[data-org="dash_starter"] td.tier')).to_have_text("starter")
            expect(page.locator('#orgs tr[data-org="dash_starter"] td.queries')).to_have_text("7", timeout=15000)
            expect(row.locator("td.conns")).to_have_text("1 / 50", timeout=15000)  # the held connection, pro's 50
            expect(row.locator("td.invoice")).to_have_text("$50.00")  # pro's base fee: nothing over yet
            expect(page.locator('#orgs tr[data-org="dash_starter"] td.invoice')).to_have_text("$10.00")
            expect(page.locator("#workers tbody tr")).to_have_count(2)
            expect(page.locator("#sum-workers")).to_have_text("2 / 2")
            before = int(row.locator("td.queries").inner_text())
            assert before >= 21  # the 20 above and the held connection's

            # Queries now: the counters and qps move without a reload (the marker survives).
            page.evaluate("window.__still_the_same_page = true")
            t = threading.Thread(target=busy, daemon=True)
            t.start()
            page.wait_for_function(
                "([sel, n]) => +document.querySelector(sel).textContent >= n",
                arg=['#orgs tr[data-org="dash_pro"] td.queries', before + 50], timeout=20000)
            page.wait_for_function(
                "() => parseFloat(document.querySelector('#orgs tr[data-org=\"dash_pro\"] td.qps').textContent) > 0"
                " && parseFloat(document.querySelector('#sum-qps').textContent) > 0", timeout=20000)
            expect(row.locator("td.conns")).to_have_text("2 / 50")
            assert page.evaluate("window.__still_the_same_page") is True
            assert page.locator("#chart-qps polyline").count() == 1
            assert int(row.locator("td.queries").inner_text()) > before
            assert "live" in page.locator("#status").inner_text()

            # Recent audit events: the logins above, once the usage shipper has written them.
            deadline = time.monotonic() + 30
            with psycopg.connect(platform_dsn, connect_timeout=10) as c:
                while not c.execute("SELECT 1 FROM platform.audit_log WHERE org = 'dash_pro' AND kind = 'login_ok'"
                                    ).fetchone():
                    assert time.monotonic() < deadline, "no login_ok audit row for dash_pro"
                    time.sleep(0.2)
            audit = page.locator("#audit tbody tr", has=page.locator("td.kind", has_text="login_ok"))
            expect(audit.filter(has_text="dash_pro").first).to_be_visible(timeout=25000)  # polled every 15 s
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            print(f"\ndashboard screenshot: {shot}")
            assert not errors, errors
            browser.close()
    finally:
        stop.set()
        held.close()



def test_rotating_the_token_ends_dashboard_sessions(migrated, tmp_path) -> None:
    import signal

    admin = free_port()
    url = f"http://127.0.0.1:{admin}"
    config = tmp_path / "o7s.toml"
    old, new = "first-dashboard-token-0123456789", "rotated-dashboard-token-987654321"
    config.write_text(f'admin_token = "{old}"\n')
    env = {k: v for k, v in migrated.items() if k != "O7S_ADMIN_TOKEN"}
    p = start_proxy(env, tmp_path, "--workers", "1", "--admin", f"127.0.0.1:{admin}", "--config", str(config))
    try:
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/ready", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "o7s serve did not get ready"
            time.sleep(0.1)
        with httpx.Client(base_url=url, timeout=10) as c:
            assert c.get("/dashboard", params={"token": old}).status_code == 303  # the bookmark way
            assert c.get("/dashboard").status_code == 200 and c.get("/v1/dashboard/audit").status_code == 200
            config.write_text(f'admin_token = "{new}"\n')
            p.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while c.get("/v1/dashboard/audit").status_code != 401:
                assert time.monotonic() < deadline, "the old session cookie still works after rotation"
                time.sleep(0.1)
            page = c.get("/dashboard")
            assert page.status_code == 401 and 'name="token"' in page.text
            assert c.post("/dashboard/login", data={"token": new}).status_code == 303
            assert c.get("/v1/dashboard/audit").status_code == 200
    finally:
        stop_proxy(p)
