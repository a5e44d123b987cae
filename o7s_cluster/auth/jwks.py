"""The JWKS key set for RS256/ES256 logins: read from a file or fetched from a URL, in the background.

A login never waits on the network: it uses the set in memory. The set is re-read every `refresh`
seconds; a token naming a key id (`kid`) the set does not have asks for one early re-read, at most every
`MIN_EARLY` seconds, so a key rotation at the issuer is picked up without a flood of fetches. A failed
read keeps the last good set (and says so in the log once).
"""

from __future__ import annotations

import json
import logging
import urllib.request
from typing import Any

import jwt
import trio

log = logging.getLogger("o7s.auth")

MAX_JWKS_BYTES = 1024 * 1024  # a key set is a few KiB; refuse to buffer more
FETCH_TIMEOUT = 10.0
MIN_EARLY = 30.0  # seconds between early re-reads asked for by an unknown kid
ASYMMETRIC = ("RS256", "ES256")


class JWKSError(Exception):
    """The key set could not be read or parsed (one line, no secrets)."""


def parse_jwks(data: bytes | str) -> dict[str | None, Any]:
    """kid -> PyJWK of the usable keys (RSA for RS256, EC P-256 for ES256); keys without a kid under None."""
    try:
        doc = json.loads(data)
        keys = doc["keys"] if isinstance(doc, dict) else None
        if not isinstance(keys, list):
            raise JWKSError("not a JWKS document: no \"keys\" list")
    except (ValueError, KeyError):
        raise JWKSError("not a JWKS document (JSON with a \"keys\" list)") from None
    out: dict[str | None, Any] = {}
    for k in keys:
        if not isinstance(k, dict) or k.get("use", "sig") != "sig" or k.get("kty") not in ("RSA", "EC"):
            continue
        try:
            jwk = jwt.PyJWK(k, algorithm=k.get("alg") or ("RS256" if k["kty"] == "RSA" else "ES256"))
        except (jwt.PyJWKError, jwt.InvalidKeyError, KeyError, ValueError, TypeError):
            continue  # a key of a kind we do not verify with, or malformed: skip it, keep the others
        if jwk.algorithm_name in ASYMMETRIC:
            out[k.get("kid")] = jwk
    return out


def read_source(source: str) -> bytes:
    """The document at a path or an http(s) URL (sync: called in a worker thread)."""
    if source.startswith(("http://", "https://")):
        req = urllib.request.Request(source, headers={"Accept": "application/json", "User-Agent": "o7s"})
        try:
            with urllib.request.urlopen(req, timeout=FETCH_TIMEOUT) as resp:  # noqa: S310 - http(s) only
                data = resp.read(MAX_JWKS_BYTES + 1)
        except OSError as e:
            raise JWKSError(f"cannot fetch the JWKS URL: {type(e).__name__}") from None
    else:
        try:
            with open(source, "rb") as f:
                data = f.read(MAX_JWKS_BYTES + 1)
        except OSError as e:
            raise JWKSError(f"cannot read the JWKS file {source}: {e.strerror}") from None
    if len(data) > MAX_JWKS_BYTES:
        raise JWKSError(f"the JWKS document is over {MAX_JWKS_BYTES} bytes")
    return data


class KeySet:
    """The keys of every configured source (file, URL), kept current by `run` in the worker's nursery."""

    def __init__(self, sources: list[str], refresh: float = 300.0) -> None:
        self.sources = sources
        self.refresh = refresh
        self.keys: dict[str | None, Any] = {}
        self.loaded = False
        self.reads = 0
        self._early = trio.Event()
        self._last_read = -MIN_EARLY
        self._warned: set[str] = set()

    def load_now(self) -> None:
        """Read every source once, synchronously (start-up: a file that is wrong fails loudly)."""
        self.keys = self._read_all(strict=True)
        self.loaded = True

    def _read_all(self, strict: bool) -> dict[str | None, Any]:
        keys: dict[str | None, Any] = {}
        failed = False
        for src in self.sources:
            try:
                keys.update(parse_jwks(read_source(src)))
                self._warned.discard(src)
            except JWKSError as e:
                if strict:
                    raise
                failed = True
                if src not in self._warned:
                    self._warned.add(src)
                    log.warning("JWKS read failed; keeping the keys already loaded", extra={"error": str(e)})
        self.reads += 1
        if failed:  # keep what we had for the sources that failed
            merged = dict(self.keys)
            merged.update(keys)
            return merged
        return keys

    def get(self, kid: str | None) -> Any:
        """The key for `kid` (None: the only key, when the set has exactly one); None when unknown."""
        key = self.keys.get(kid)
        if key is None and kid is None and len(self.keys) == 1:
            key = next(iter(self.keys.values()))
        if key is None and self.sources:
            self._early.set()  # perhaps rotated at the issuer: re-read soon (not on this login's path)
        return key

    def reload(self, sources: list[str], refresh: float) -> None:
        """SIGHUP: new sources or the same ones re-read now (a key rotated by hand)."""
        self.sources, self.refresh = sources, refresh
        self._last_read = -MIN_EARLY
        self._early.set()

    async def run(self) -> None:
        """Read at once, then every `refresh` seconds (sooner, once, after an unknown kid or a reload)."""
        first = True
        while True:
            if not first or not self.sources:
                with trio.move_on_after(self.refresh if self.sources else float("inf")):
                    await self._early.wait()
                    # an unknown kid: at most one early read every MIN_EARLY seconds
                    await trio.sleep_until(max(trio.current_time(), self._last_read + MIN_EARLY))
            first = False
            self._early = trio.Event()
            if not self.sources:
                self.keys = {}
                continue
            self._last_read = trio.current_time()
            self.keys = await trio.to_thread.run_sync(self._read_all, False, abandon_on_cancel=True)
            self.loaded = True
