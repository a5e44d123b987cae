"""Token logins on the Redis port (issue 12 with 13.2/13.3): `AUTH token.ORG <jwt-or-api-key>` through a real
`o7s serve --redis-listen` with TLS, a JWT secret and a real redis-server; over plain TCP they are refused
(the Postgres rule), and every bad token is a WRONGPASS like a wrong password."""

from __future__ import annotations

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from conftest import add_redis, free_port, run_o7s, start_proxy, stop_proxy, wait_port
from test_auth_jwt import OTHER_SECRET, SECRET, token
from test_tls import _PROXY_CERT, _PROXY_KEY


@pytest.fixture(scope="module")
def token_port(migrated, backend, tmp_path_factory):
    env = dict(migrated, O7S_JWT_SECRET=SECRET)
    port = free_port()
    p = start_proxy(env, tmp_path_factory.mktemp("redis-tokens"), "--workers", "1", "--tls-cert", _PROXY_CERT,
                    "--tls-key", _PROXY_KEY, "--redis-listen", f"127.0.0.1:{port}")
    wait_port("127.0.0.1", port, proc=p.proc)
    yield port
    stop_proxy(p)


def connect(port: int, user: str, password: str, *, tls: bool = True) -> redis.Redis:
    # one AUTH attempt (redis-py would retry a refused one on its own and trip the login breaker)
    return redis.Redis(host="127.0.0.1", port=port, username=user, password=password, ssl=tls,
                       ssl_cert_reqs="none", socket_timeout=10, retry=Retry(NoBackoff(), 0))


def test_jwt_and_api_key_log_in_over_tls(token_port, migrated, backend, make_org) -> None:
    org = make_org("rtok_a", "pro")
    add_redis(migrated, org, backend)
    c = connect(token_port, f"token.{org.name}", token(org.name))
    assert c.set("via", "jwt") and c.get("via") == b"jwt"
    key = run_o7s(migrated, "org", "apikey", "create", org.name).stdout.strip()
    k = connect(token_port, f"token.{org.name}", key)
    assert k.get("via") == b"jwt"  # the same org's namespace
    assert connect(token_port, org.name, org.password).get("via") == b"jwt"  # the password still works on TLS
    keys = {x["prefix"]: x for x in __import__("json").loads(
        run_o7s(migrated, "org", "apikey", "list", org.name, "--json").stdout)}
    assert key[4:16] in keys


def test_bad_tokens_are_wrongpass(token_port, migrated, backend, make_org) -> None:
    org = make_org("rtok_b", "pro")
    other = make_org("rtok_c", "pro")
    add_redis(migrated, org, backend)
    other_key = run_o7s(migrated, "org", "apikey", "create", other.name).stdout.strip()
    for bad in (token(org.name, ttl=-60), token(org.name, key=OTHER_SECRET), token(other.name), other_key,
                "o7s_000000000000_" + "A" * 43, "not-a-token"):
        with pytest.raises(redis.AuthenticationError) as e:
            connect(token_port, f"token.{org.name}", bad).ping()
        msg = str(e.value)
        assert "invalid username-password pair" in msg, msg
        for leak in ("expired", "signature", "other org", "claim"):
            assert leak not in msg, msg
    revoked = run_o7s(migrated, "org", "apikey", "create", org.name, "--name", "gone").stdout.strip()
    run_o7s(migrated, "org", "apikey", "revoke", org.name, "gone")
    with pytest.raises(redis.AuthenticationError):
        connect(token_port, f"token.{org.name}", revoked).ping()


def test_token_login_needs_tls(migrated, backend, make_org, tmp_path) -> None:
    """Without a certificate the Redis port is plain TCP: token logins are refused, passwords work."""
    org = make_org("rtok_d", "pro")
    add_redis(migrated, org, backend)
    port = free_port()
    p = start_proxy(dict(migrated, O7S_JWT_SECRET=SECRET), tmp_path, "--workers", "1",
                    "--redis-listen", f"127.0.0.1:{port}")
    try:
        wait_port("127.0.0.1", port, proc=p.proc)
        with pytest.raises(redis.ResponseError, match=r'token logins \(user "token.ORG"\) need TLS'):
            connect(port, f"token.{org.name}", token(org.name), tls=False).ping()
        assert connect(port, org.name, org.password, tls=False).ping()
    finally:
        stop_proxy(p)


def test_a_cut_off_tls_handshake_is_no_failure(migrated, backend, make_org, tmp_path) -> None:
    """Clients that drop the connection before or during the TLS handshake leave one quiet close each, no
    "redis session failed" traceback in the log (the nursery's exception group used to hide that they
    were only a client going away); the port serves the next client as before."""
    import socket
    import ssl

    org = make_org("rtok_e", "pro")
    add_redis(migrated, org, backend)
    port = free_port()
    p = start_proxy(migrated, tmp_path, "--workers", "1", "--tls-cert", _PROXY_CERT, "--tls-key", _PROXY_KEY,
                    "--redis-listen", f"127.0.0.1:{port}")
    try:
        wait_port("127.0.0.1", port, proc=p.proc)
        for first in (b"", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"PING\r\n"):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(first)
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            tls = ctx.wrap_socket(s)  # a full handshake, then a reset instead of a close_notify
            tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            tls.close()
        assert connect(port, org.name, org.password).ping()
    finally:
        stop_proxy(p)
    text = p.log.read_text()
    assert "redis session failed" not in text and "Traceback" not in text, text[-3000:]
