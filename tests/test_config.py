"""Settings: defaults < TOML < environment < CLI flags, and a one-line error for any bad value."""

import pytest

from o7s_cluster.config import ConfigError, Settings, load_settings, parse_listen


def test_defaults():
    s = load_settings(env={})
    assert s == Settings()
    assert (s.listen, s.pool_mode, s.platform_dsn, s.secret_key) == ("127.0.0.1:6432", "transaction", None, None)
    assert (s.startup_timeout, s.pool_timeout, s.server_idle_timeout, s.server_connect_timeout) == (10, 5, 300, 5)
    assert s.max_message_size == 64 * 1024 * 1024 and s.log_level == "info" and not s.tls_enabled


def test_precedence(tmp_path):
    cfg = tmp_path / "o7s.toml"
    cfg.write_text(
        'listen = "0.0.0.0:7000"\npool_mode = "session"\npool_timeout = 2\nlog_level = "debug"\n'
        'platform_dsn = "postgresql://file@h/p"\nmax_message_size = "1MiB"\n'
    )
    s = load_settings(cfg, env={})
    assert (s.listen_host, s.listen_port, s.pool_mode, s.pool_timeout) == ("0.0.0.0", 7000, "session", 2.0)
    assert s.platform_dsn == "postgresql://file@h/p" and s.max_message_size == 1024 * 1024

    env = {"O7S_LISTEN": "127.0.0.2:7001", "O7S_POOL_TIMEOUT": "500ms", "DATABASE_URL": "postgresql://railway@h/p"}
    s = load_settings(cfg, env=env)
    assert (s.listen, s.pool_timeout, s.pool_mode) == ("127.0.0.2:7001", 0.5, "session")
    assert s.platform_dsn == "postgresql://railway@h/p"  # DATABASE_URL beats the file

    env["O7S_PLATFORM_DSN"] = "postgresql://o7s@h/p"
    assert load_settings(cfg, env=env).platform_dsn == "postgresql://o7s@h/p"  # O7S_ beats DATABASE_URL

    s = load_settings(cfg, env=env, overrides={"listen": "[::1]:7002", "pool_mode": None, "pool_timeout": "3"})
    assert (s.listen_host, s.listen_port, s.listen, s.pool_mode, s.pool_timeout) == (
        "::1", 7002, "[::1]:7002", "session", 3.0)


def test_config_path_from_env_and_o7s_table(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[o7s]\nlisten_port = 7100\nstartup_timeout = "2m"\n')
    s = load_settings(env={"O7S_CONFIG": str(cfg)})
    assert s.listen_port == 7100 and s.startup_timeout == 120


def test_tls_pair(tmp_path):
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x"), key.write_text("y")
    s = load_settings(env={"O7S_TLS_CERT": str(cert), "O7S_TLS_KEY": str(key)})
    assert s.tls_enabled and s.tls_key == str(key)
    with pytest.raises(ConfigError, match="together"):
        load_settings(env={"O7S_TLS_CERT": str(cert)})
    with pytest.raises(ConfigError, match="no such file"):
        load_settings(env={}, overrides={"tls_cert": str(cert), "tls_key": str(tmp_path / "missing")})


@pytest.mark.parametrize(
    "env, match",
    [
        ({"O7S_POOL_MODE": "statement"}, "pool_mode must be one of transaction, session"),
        ({"O7S_LISTEN": "nohost"}, "environment: invalid O7S_LISTEN: expected HOST:PORT"),
        ({"O7S_LISTEN": "h:70000"}, "0-65535"),
        ({"O7S_LISTEN_PORT": "http"}, "invalid O7S_LISTEN_PORT"),
        ({"O7S_POOL_TIMEOUT": "soon"}, "invalid O7S_POOL_TIMEOUT"),
        ({"O7S_STARTUP_TIMEOUT": "0"}, "greater than 0"),
        ({"O7S_MAX_MESSAGE_SIZE": "12 parsecs"}, "invalid O7S_MAX_MESSAGE_SIZE"),
        ({"O7S_MAX_MESSAGE_SIZE": "2GiB"}, "between 1KiB and 1GiB"),
        ({"O7S_LOG_LEVEL": "chatty"}, "log_level"),
    ],
)
def test_bad_values_are_one_line(env, match):
    with pytest.raises(ConfigError, match=match) as ei:
        load_settings(env=env)
    assert "\n" not in str(ei.value)


def test_bad_toml(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("listen = \n")
    with pytest.raises(ConfigError, match="config file"):
        load_settings(cfg, env={})
    cfg.write_text('pool_mod = "session"\n')
    with pytest.raises(ConfigError, match="unknown setting 'pool_mod'"):
        load_settings(cfg, env={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "nope.toml", env={})
    cfg.write_text("pool_timeout = true\n")
    with pytest.raises(ConfigError, match="pool_timeout"):
        load_settings(cfg, env={})


def test_secrets_not_in_repr_or_errors(tmp_path):
    s = load_settings(env={"O7S_SECRET_KEY": "k" * 44, "O7S_PLATFORM_DSN": "postgresql://u:TopSecret@h/d"})
    assert "TopSecret" not in repr(s) and "k" * 44 not in repr(s)
    cfg = tmp_path / "c.toml"
    cfg.write_text("secret_key = 12345678901\n")
    with pytest.raises(ConfigError) as ei:
        load_settings(cfg, env={})
    assert "12345678901" not in str(ei.value)


def test_parse_listen():
    assert parse_listen("0.0.0.0:5") == ("0.0.0.0", 5)
    assert parse_listen(":6432") == ("0.0.0.0", 6432)
    assert parse_listen("6432") == ("0.0.0.0", 6432)
    assert parse_listen("[::]:1") == ("::", 1)
    with pytest.raises(ValueError):
        parse_listen("::1:5")
