"""The live dashboard on the admin port: ``/dashboard`` (a page and its two static files, shipped in this
package, no CDN) and the JSON it reads besides ``/v1/cluster`` and ``/v1/orgs``.

Why a cookie: a browser cannot send ``Authorization: Bearer`` on a plain page load, so the page takes the
admin token once (the login form, or ``/dashboard?token=...`` for a screen that opens a bookmark) and sets
an HttpOnly, SameSite=Strict cookie holding an HMAC of the token, never the token itself. The cookie is
accepted for reads (GET/HEAD) only, never for changes (so a cross-site form cannot scale the cluster), and
it stops working when the token is rotated (SIGHUP). With no admin token configured the dashboard is off.

``/v1/dashboard/account`` (tier ceilings, this month's usage and invoice so far per org, from the control
plane, at most one query every ``ACCOUNT_TTL`` seconds whatever the number of open dashboards) and
``/v1/dashboard/audit`` (recent rows of platform.audit_log, or [] with a note while that table does not
exist) always need the token: they hold billing and audit data, which the open metrics reads do not.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone
from http.cookies import CookieError, SimpleCookie
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

import orjson
import trio

from o7s_cluster.control_plane.db import CatalogError, connect, one_line
from o7s_cluster.usage import billing

log = logging.getLogger("o7s.admin.dashboard")

COOKIE = "o7s_admin"
_SESSION_MSG = b"o7s-dashboard-session"
ASSETS = {"app.js": b"text/javascript; charset=utf-8", "style.css": b"text/css; charset=utf-8"}
HTML = b"text/html; charset=utf-8"
JSON = b"application/json"
ACCOUNT_TTL = 10.0  # seconds between control-plane reads for the account panel
AUDIT_TTL = 5.0
AUDIT_LIMIT = 50  # rows of platform.audit_log shown
DB_TIMEOUT = 10.0
MAX_FORM = 4096  # the login form's body
PRIVATE_PREFIX = "/v1/dashboard/"
LIMIT_COLUMNS = ("max_connections", "max_qps", "max_storage_gb", "pool_size")


def session_value(token: str) -> str:
    """What the session cookie holds: an HMAC of the token (a stolen cookie is not the token)."""
    return hmac.new(token.encode(), _SESSION_MSG, hashlib.sha256).hexdigest()


def cookie_ok(headers: Any, token: str) -> bool:
    """Whether the request carries the dashboard's session cookie for this token."""
    want = session_value(token).encode()
    for name, value in headers:
        if name.lower() != b"cookie":
            continue
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(bytes(value).decode("latin-1"))
        except CookieError:
            continue
        morsel = jar.get(COOKIE)
        if morsel is not None and hmac.compare_digest(morsel.value.encode(), want):
            return True
    return False


def bearer_ok(headers: Any, token: str) -> bool:
    given = b""
    for name, value in headers:
        if name.lower() == b"authorization":
            given = bytes(value)
            break
    return given[:7].lower() == b"bearer " and hmac.compare_digest(given[7:].strip(), token.encode())


def _asset(name: str) -> bytes:
    return resources.files(__package__).joinpath(name).read_bytes()


class Dashboard:
    """The page, its login, and the two control-plane reads (cached, one at a time)."""

    def __init__(self, platform_dsn: Callable[[], str | None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.platform_dsn = platform_dsn or (lambda: None)
        self.clock = clock
        self._files = {name: _asset(name) for name in ASSETS}
        self._index = _asset("index.html")
        self._login = _asset("login.html").decode()
        self._lock = trio.Lock()
        self._cache: dict[str, tuple[float, int, bytes]] = {}

    # ------------------------------------------------------------------------------------------ the page

    async def page(self, method: str, path: str, query: bytes, headers: Any, receive: Callable,
                   token: str | None) -> tuple[int, list, bytes]:
        """/dashboard, /dashboard/login and the static files; the caller did no token check."""
        path = path.rstrip("/") or "/"
        name = path[len("/dashboard/"):] if path.startswith("/dashboard/") else ""
        if name in self._files:
            if method != "GET":
                return 405, [(b"allow", b"GET, HEAD"), (b"content-type", JSON)], b'{"error":"method not allowed"}'
            return 200, [(b"content-type", ASSETS[name])], self._files[name]
        if path not in ("/dashboard", "/dashboard/login"):
            return 404, [(b"content-type", JSON)], orjson.dumps({"error": f"no such endpoint: {path[:200]}"})
        if token is None:
            return self._login_page(403, "The dashboard needs an admin token, and none is configured: set"
                                         " O7S_ADMIN_TOKEN (or admin_token in the config file) and reload.")
        if path == "/dashboard/login":
            if method != "POST":
                return 303, [(b"location", b"/dashboard")], b""
            form = parse_qs((await _form(receive)).decode("utf-8", "replace"))
            given = (form.get("token") or [""])[0].strip()
            return self._log_in(given, token)
        if method != "GET":
            return 405, [(b"allow", b"GET, HEAD"), (b"content-type", JSON)], b'{"error":"method not allowed"}'
        given = (parse_qs(query.decode("latin-1")).get("token") or [""])[0]
        if given:  # a bookmark for a wall screen: log in, and take the token out of the address bar
            return self._log_in(given, token)
        if cookie_ok(headers, token) or bearer_ok(headers, token):
            return 200, [(b"content-type", HTML)], self._index
        return self._login_page(401, "")

    def _log_in(self, given: str, token: str) -> tuple[int, list, bytes]:
        if not hmac.compare_digest(given.encode(), token.encode()):
            log.warning("dashboard login refused: wrong token")
            return self._login_page(401, "That is not the admin token.")
        cookie = f"{COOKIE}={session_value(token)}; Path=/; HttpOnly; SameSite=Strict"
        return 303, [(b"location", b"/dashboard"), (b"set-cookie", cookie.encode())], b""

    def _login_page(self, status: int, message: str) -> tuple[int, list, bytes]:
        body = self._login.replace("{{message}}", html.escape(message)).encode()
        return status, [(b"content-type", HTML)], body

    # ------------------------------------------------------------------------------------------ JSON

    async def account(self) -> tuple[int, list, bytes]:
        return await self._cached("account", ACCOUNT_TTL, _account)

    async def audit(self) -> tuple[int, list, bytes]:
        return await self._cached("audit", AUDIT_TTL, _audit)

    async def _cached(self, key: str, ttl: float, read: Callable[[str], dict]) -> tuple[int, list, bytes]:
        async with self._lock:
            hit = self._cache.get(key)
            if hit is not None and self.clock() - hit[0] < ttl:
                return hit[1], [(b"content-type", JSON)], hit[2]
            dsn = self.platform_dsn()
            if not dsn:
                status, doc = 503, {"error": "no control plane is configured (O7S_PLATFORM_DSN)"}
            else:
                status, doc = 200, {}
                with trio.move_on_after(DB_TIMEOUT) as scope:
                    try:
                        doc = await trio.to_thread.run_sync(read, dsn, abandon_on_cancel=True)
                    except CatalogError as e:
                        status, doc = 503, {"error": str(e)}
                    except Exception as e:  # noqa: BLE001 - the panel says why; the page goes on
                        log.warning("dashboard read failed", extra={"panel": key, "error": one_line(e)})
                        status, doc = 503, {"error": f"control-plane read failed: {type(e).__name__}"}
                if scope.cancelled_caught:
                    status, doc = 503, {"error": f"control-plane read timed out after {DB_TIMEOUT:g} s"}
            body = orjson.dumps(doc, default=str)
            self._cache[key] = (self.clock(), status, body)
            return status, [(b"content-type", JSON)], body


async def _form(receive: Callable) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_FORM:
            return b""
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _account(dsn: str) -> dict:
    """Tier ceilings, and each org's usage this month with its invoice so far (as `o7s bill` computes it)."""
    now = datetime.now(timezone.utc)
    period = now.strftime("%Y-%m")
    with connect(dsn, autocommit=True) as conn:
        cols = ", ".join(LIMIT_COLUMNS)
        limits = {r[0]: dict(zip(LIMIT_COLUMNS, r[1:])) for r in conn.execute(
            f"SELECT tier, {cols} FROM platform.tier_limits ORDER BY rank").fetchall()}
        prices = billing.load_tiers(conn)
        usage = billing.load_usage(conn, period)
    orgs = {}
    for u in usage:
        doc: dict[str, Any] = {"tier": u.tier, "vcpu_hours": u.vcpu_hours, "memory_gb_hours": u.memory_gb_hours,
                               "queries": u.queries, "bytes_out": u.bytes_out, "invoice": None}
        if u.tier in prices:
            inv = billing.invoice(u, prices[u.tier], period)
            doc["invoice"] = {"base_fee": inv.base_fee, "vcpu_included": inv.vcpu_included,
                              "memory_included": inv.memory_included, "vcpu_overage_usd": inv.vcpu_overage_usd,
                              "memory_overage_usd": inv.memory_overage_usd, "total": inv.total,
                              "over_included": inv.over_included}
        orgs[u.org] = doc
    return {"period": period, "as_of": now.isoformat(timespec="seconds"), "tiers": limits, "orgs": orgs}


def _audit(dsn: str) -> dict:
    """The newest rows of platform.audit_log, or [] with a note while the table does not exist."""
    with connect(dsn, autocommit=True) as conn:
        if conn.execute("SELECT to_regclass('platform.audit_log')").fetchone()[0] is None:
            return {"events": [], "note": "platform.audit_log does not exist yet (run `o7s migrate` after"
                                          " upgrading to a release with the audit log)"}
        rows = conn.execute(
            "SELECT id::text, at, org, kind, actor, source, method, detail, count FROM platform.audit_log"
            " ORDER BY at DESC LIMIT %s", (AUDIT_LIMIT,)).fetchall()
    keys = ("id", "at", "org", "kind", "actor", "source", "method", "detail", "count")
    return {"events": [dict(zip(keys, r)) for r in rows], "note": None}


__all__ = ["COOKIE", "Dashboard", "PRIVATE_PREFIX", "bearer_ok", "cookie_ok", "session_value"]
