"""`o7s serve` settings: defaults < TOML file < O7S_* environment < command-line flags.

Every value is checked here, once, so a typo is a one-line error at start-up, not a surprise later.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

POOL_MODES = ("transaction", "session")
LOG_LEVELS = ("debug", "info", "warning", "error")
ENGINES = ("local", "ray")


class ConfigError(ValueError):
    """A bad setting; the message names the setting and where it came from, never a secret."""


@dataclass(frozen=True)
class Settings:
    listen_host: str = "127.0.0.1"
    listen_port: int = 6432
    pool_mode: str = "transaction"
    platform_dsn: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    tls_cert: str | None = None
    tls_key: str | None = None
    startup_timeout: float = 10.0  # seconds a client may take to finish startup and auth
    pool_timeout: float = 5.0  # bounded wait for a free backend connection
    server_idle_timeout: float = 300.0  # idle backend connections are closed after this
    server_connect_timeout: float = 5.0
    max_message_size: int = 64 * 1024 * 1024  # cap for any length read from the wire
    message_timeout: float = 30.0  # a client message that stops arriving mid-way is given up after this
    input_budget: int = 256 * 1024 * 1024  # a worker's bytes of partial client messages past each one's 64 KiB
    preauth_budget: int = 32 * 1024 * 1024  # a worker's bytes held for clients not yet logged in
    catalog_ttl: float = 5.0  # seconds control-plane answers are cached per worker
    log_level: str = "info"
    # --- cluster (supervisor and workers) ---
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    admin_listen: str | None = None  # HOST:PORT of the admin HTTP port; None: no admin port
    redis_listen: str | None = None  # HOST:PORT where O7s speaks RESP to Redis clients; None: off
    # Bearer token for the admin port's state-changing requests (None: those are refused); with
    # admin_auth_reads, also for /metrics and /v1/* reads. /health and /ready never need it.
    admin_token: str | None = field(default=None, repr=False)
    admin_auth_reads: bool = False
    # --- login circuit breaker: after this many failed logins for an org from one address within the window,
    # that address is refused for that org for `auth_breaker_block` seconds (0 failures: off) ---
    auth_breaker_failures: int = 10
    auth_breaker_window: float = 150.0
    auth_breaker_block: float = 120.0
    # --- token logins (user TOKEN_USER.ORG, the token as a cleartext password): JWTs and API keys ---
    jwt_secret: str | None = field(default=None, repr=False)  # HS256 key; None: no HS256 tokens
    jwks_file: str | None = None  # RS256/ES256 public keys (a JWKS document)
    jwks_url: str | None = None  # the same, fetched in the background every jwks_refresh
    jwks_refresh: float = 300.0
    jwt_org_claim: str = "org"
    jwt_role_claim: str = "role"
    jwt_audience: str | None = None  # when set, tokens must carry it in `aud`
    jwt_issuer: str | None = None  # when set, tokens must carry it in `iss`
    token_login_plaintext: bool = False  # accept token logins without TLS (trusted networks only)
    drain_timeout: float = 30.0  # SIGTERM: how long open transactions may take to finish
    machine_id: int = 0  # 0-127, encoded in the BackendKeyData O7s hands out
    run_dir: str | None = None  # where workers' Unix sockets live (default: a fresh temp dir)
    # --- engine: "local" (a supervisor and worker processes) or "ray" (Ray actors on every node) ---
    engine: str = "local"
    ray_address: str | None = None  # Ray cluster to join (default: $RAY_ADDRESS, else a new local Ray)
    workers_per_node: int | None = None  # Ray engine: workers on each node (default: the node's CPUs)
    # --- limits (Redis) ---
    redis_url: str | None = field(default=None, repr=False)
    rate_sync_interval: float = 0.1  # T: how often a worker tops up its local tokens from Redis
    rate_burst_seconds: float = 1.0  # B = L x this, for tiers that may burst (others: B = 1)
    # --- usage ---
    usage_window: float = 10.0
    spool_dir: str = ".o7s/spool"
    mongodb_url: str | None = field(default=None, repr=False)
    usage_sink_postgres: bool = True  # ship usage records to the control plane's platform.usage_metrics

    @property
    def listen(self) -> str:
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"{host}:{self.listen_port}"

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
_SECRETS = frozenset(("platform_dsn", "secret_key", "redis_url", "mongodb_url", "admin_token", "jwt_secret"))
MIN_JWT_SECRET = 32  # characters: RFC 7518 wants an HS256 key of at least 256 bits
MIN_ADMIN_TOKEN = 16  # characters: a token short enough to guess protects nothing
_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")  # visible ASCII: it travels in an HTTP header
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?\s*$")
_SIZE = re.compile(r"^\s*([0-9]+)\s*(b|kb|kib|mb|mib|gb|gib)?\s*$", re.I)
_SIZE_UNITS = {None: 1, "b": 1, "kb": 1024, "kib": 1024, "mb": 1024**2, "mib": 1024**2, "gb": 1024**3, "gib": 1024**3}


def parse_listen(value: str) -> tuple[str, int]:
    """HOST:PORT, [v6]:PORT, :PORT or PORT."""
    v = str(value).strip()
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]*):(\d+)|(\d+)", v)
    if not m:
        raise ValueError(f"expected HOST:PORT, got {v!r}")
    host = m.group(1) or m.group(3) or ""
    port = int(m.group(2) or m.group(4) or m.group(5))
    return host or "0.0.0.0", port


def _duration(v: Any) -> float:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    m = _DURATION.match(str(v))
    if not m:
        raise ValueError(f"expected seconds (e.g. 5, 1.5, 500ms, 2m), got {v!r}")
    return float(m.group(1)) * {None: 1, "ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def _size(v: Any) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    m = _SIZE.match(str(v))
    if not m:
        raise ValueError(f"expected a size in bytes (e.g. 67108864, 64MiB), got {v!r}")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2) and m.group(2).lower()]


def _convert(name: str, value: Any) -> Any:
    if name == "listen_port":
        if isinstance(value, bool) or not str(value).strip().isdigit():
            raise ValueError(f"expected a port number, got {value!r}")
        return int(value)
    if name in ("max_message_size", "input_budget", "preauth_budget"):
        return _size(value)
    if name in ("workers", "machine_id", "workers_per_node", "auth_breaker_failures"):
        if isinstance(value, bool) or not str(value).strip().isdigit():
            raise ValueError(f"expected a whole number, got {value!r}")
        return int(value)
    if name in ("usage_sink_postgres", "admin_auth_reads", "token_login_plaintext"):
        if isinstance(value, bool):
            return value
        v = str(value).strip().lower()
        if v not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ValueError(f"expected true or false, got {value!r}")
        return v in ("1", "true", "yes", "on")
    if name in ("startup_timeout", "pool_timeout", "server_idle_timeout", "server_connect_timeout", "catalog_ttl",
                "drain_timeout", "rate_sync_interval", "rate_burst_seconds", "usage_window", "auth_breaker_window",
                "auth_breaker_block", "message_timeout", "jwks_refresh"):
        return _duration(value)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    if name in ("platform_dsn", "secret_key", "tls_cert", "tls_key", "admin_listen", "redis_listen", "run_dir",
                "redis_url", "mongodb_url", "ray_address", "admin_token", "jwt_secret", "jwks_file", "jwks_url",
                "jwt_audience", "jwt_issuer"):
        return value.strip() or None
    return value.strip()


def _apply(values: dict[str, Any], source: Mapping[str, Any], origin: str) -> None:
    """`source` maps how the user spelled a setting (a TOML key, O7S_POOL_MODE, pool_mode) to its value."""
    for key, raw in source.items():
        if raw is None:
            continue
        name = _ENV_NAMES.get(key) or key.replace("-", "_")
        try:
            if name == "listen":
                values["listen_host"], values["listen_port"] = parse_listen(raw)
                continue
            if name not in _FIELDS:
                raise ConfigError(f"{origin}: unknown setting {key!r}")
            values[name] = _convert(name, raw)
        except ValueError as e:
            if isinstance(e, ConfigError):
                raise
            shown = "" if name in _SECRETS else f": {e}"
            raise ConfigError(f"{origin}: invalid {key}{shown}") from None


def _validate(s: Settings) -> None:
    if s.pool_mode not in POOL_MODES:
        raise ConfigError(f"pool_mode must be one of {', '.join(POOL_MODES)}, not {s.pool_mode!r}")
    if s.log_level.lower() not in LOG_LEVELS:
        raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}, not {s.log_level!r}")
    if not 0 <= s.listen_port <= 65535:
        raise ConfigError(f"listen port must be 0-65535, not {s.listen_port}")
    for name in ("startup_timeout", "pool_timeout", "server_idle_timeout", "server_connect_timeout"):
        if getattr(s, name) <= 0:
            raise ConfigError(f"{name} must be greater than 0")
    if not 1 <= s.workers <= 64:
        raise ConfigError("workers must be between 1 and 64")
    if not 0 <= s.machine_id <= 127:
        raise ConfigError("machine_id must be between 0 and 127")
    if s.engine not in ENGINES:
        raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, not {s.engine!r}")
    if s.workers_per_node is not None and not 1 <= s.workers_per_node <= 64:
        raise ConfigError("workers_per_node must be between 1 and 64")
    if s.admin_listen is not None:
        try:
            parse_listen(s.admin_listen)
        except ValueError as e:
            raise ConfigError(f"admin_listen: {e}") from None
    if s.redis_listen is not None:
        try:
            parse_listen(s.redis_listen)
        except ValueError as e:
            raise ConfigError(f"redis_listen: {e}") from None
    if s.admin_token is not None:
        if len(s.admin_token) < MIN_ADMIN_TOKEN or not _TOKEN_CHARS.fullmatch(s.admin_token):
            raise ConfigError(f"admin_token must be at least {MIN_ADMIN_TOKEN} visible ASCII characters"
                              " (e.g. `openssl rand -hex 32`)")
    elif s.admin_auth_reads:
        raise ConfigError("admin_auth_reads needs an admin_token")
    if not 0 <= s.auth_breaker_failures <= 1000:
        raise ConfigError("auth_breaker_failures must be between 0 (off) and 1000")
    for name in ("drain_timeout", "rate_sync_interval", "rate_burst_seconds", "usage_window", "auth_breaker_window",
                 "auth_breaker_block"):
        if getattr(s, name) <= 0:
            raise ConfigError(f"{name} must be greater than 0")
    if s.catalog_ttl < 0:
        raise ConfigError("catalog_ttl must not be negative")
    if not 1024 <= s.max_message_size <= 1024**3:
        raise ConfigError("max_message_size must be between 1KiB and 1GiB")
    if s.jwt_secret is not None and len(s.jwt_secret) < MIN_JWT_SECRET:
        raise ConfigError(f"jwt_secret must be at least {MIN_JWT_SECRET} characters (e.g. `openssl rand -hex 32`)")
    if s.jwks_file is not None and not Path(s.jwks_file).is_file():
        raise ConfigError(f"jwks_file: no such file: {s.jwks_file}")
    if s.jwks_url is not None and not s.jwks_url.startswith(("https://", "http://")):
        raise ConfigError("jwks_url must be an http(s) URL")
    if s.jwks_refresh < 1:
        raise ConfigError("jwks_refresh must be at least 1 s")
    for name in ("jwt_org_claim", "jwt_role_claim"):
        if not getattr(s, name):
            raise ConfigError(f"{name} must not be empty")
    if (s.tls_cert is None) != (s.tls_key is None):
        raise ConfigError("tls_cert and tls_key must be given together")
    for name in ("tls_cert", "tls_key"):
        path = getattr(s, name)
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{name}: no such file: {path}")


_ENV_NAMES = {f"O7S_{n.upper()}": n for n in [*_FIELDS, "listen"]} | {
    "DATABASE_URL": "platform_dsn", "REDIS_URL": "redis_url", "MONGODB_URL": "mongodb_url",
}
# Railway-style names, used when the O7S_* one is not set.
_FALLBACK_ENV = {"DATABASE_URL": "O7S_PLATFORM_DSN", "REDIS_URL": "O7S_REDIS_URL", "MONGODB_URL": "O7S_MONGODB_URL"}


def _from_env(env: Mapping[str, str]) -> dict[str, str]:
    out = {var: env[var] for var in _ENV_NAMES if env.get(var) and var not in _FALLBACK_ENV}
    for var, primary in _FALLBACK_ENV.items():
        if primary not in out and env.get(var):
            out[var] = env[var]
    return out


def load_settings(
    config_path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build Settings from every source; `overrides` are the CLI flags (None means not given)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    path = config_path or env.get("O7S_CONFIG")
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path}: {e}") from None
        data = data.get("o7s", data)  # both a top-level table and [o7s] work
        _apply(values, data, f"config file {path}")
    _apply(values, _from_env(env), "environment")
    _apply(values, overrides or {}, "command line")
    s = Settings(**values)
    s = dataclasses.replace(s, log_level=s.log_level.lower())
    _validate(s)
    return s
