"""JWT logins (issue 13, step 2) through a real `o7s serve --workers 2` with TLS: psycopg and psql present
fresh, expired, foreign-key and other-org tokens as the password of the user `token.ORG`."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import jwt
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from conftest import RawPG, admin_dsn, first_error, start_proxy, stop_proxy
from test_tls import _PROXY_CERT, _PROXY_KEY

SECRET = "s" * 16 + "-platform-jwt-secret-for-tests"
OTHER_SECRET = "o" * 16 + "-some-other-platform-secret-xx"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
FOREIGN_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk(key, kid: str, alg: str) -> dict:
    doc = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()) if alg == "RS256"
                     else jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    return doc | {"kid": kid, "alg": alg, "use": "sig"}


JWKS = {"keys": [jwk(RSA_KEY, "rsa-1", "RS256"), jwk(EC_KEY, "ec-1", "ES256")]}


def token(org: str, *, key=SECRET, alg="HS256", kid: str | None = None, ttl: float = 300, **claims) -> str:
    body = {"org": org, "sub": "user-42", "exp": int(time.time() + ttl)} | claims
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(body, key, algorithm=alg, headers={"kid": kid} if kid else None)


def refused_as_bad_password(dsn: str, user: str) -> str:
    with pytest.raises(psycopg.OperationalError) as e:
        psycopg.connect(dsn, autocommit=True, connect_timeout=10)
    msg = str(e.value)
    assert f'password authentication failed for user "{user}"' in msg, msg
    for leak in ("expired", "signature", "kid", "claim", "org", "JWKS"):  # nothing an attacker could use
        assert leak not in msg.replace(f'"{user}"', ""), msg
    return msg


@pytest.fixture(scope="module")
def jwks_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("jwks") / "jwks.json"
    p.write_text(json.dumps(JWKS))
    return p


@pytest.fixture(scope="module")
def jwt_proxy(migrated, tmp_path_factory, jwks_file):
    env = dict(migrated, O7S_JWT_SECRET=SECRET)
    p = start_proxy(env, tmp_path_factory.mktemp("jwt"), "--workers", "2", "--tls-cert", _PROXY_CERT,
                    "--tls-key", _PROXY_KEY, "--jwks-file", str(jwks_file))
    yield p
    stop_proxy(p)


def dsn(proxy, org, tok: str, **kw) -> str:
    return proxy.dsn(org, user=f"token.{org.name}", password=tok, **({"sslmode": "require"} | kw))


def test_fresh_hs256_token_logs_in_and_a_password_still_works(jwt_proxy, make_org):
    org = make_org("jwt_hs", "pro")
    with psycopg.connect(dsn(jwt_proxy, org, token(org.name)), autocommit=True) as conn:
        assert conn.execute("SELECT current_user, 40 + 2").fetchone() == (f"{org.name}_owner", 42)
    with psycopg.connect(jwt_proxy.dsn(org, sslmode="require"), autocommit=True) as conn:  # SCRAM as before
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize("alg,key,kid", [("RS256", RSA_KEY, "rsa-1"), ("ES256", EC_KEY, "ec-1")])
def test_jwks_signed_tokens(jwt_proxy, make_org, alg, key, kid):
    org = make_org("jwt_asym", "pro")
    with psycopg.connect(dsn(jwt_proxy, org, token(org.name, key=key, alg=alg, kid=kid)), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_bad_tokens_get_28p01_and_nothing_else(jwt_proxy, make_org):
    org = make_org("jwt_bad", "pro")
    other = make_org("jwt_other", "pro")
    user = f"token.{org.name}"
    cases = {
        "expired": token(org.name, ttl=-120),
        "other secret": token(org.name, key=OTHER_SECRET),
        "foreign RSA key, known kid": token(org.name, key=FOREIGN_RSA, alg="RS256", kid="rsa-1"),
        "another org's token": token(other.name),
        "no expiry": token(org.name, exp=None),
        "not a JWT": "hunter2",
    }
    for why, tok in cases.items():
        msg = refused_as_bad_password(dsn(jwt_proxy, org, tok), user)
        assert "password authentication failed" in msg, why
    # the org's own password as a token is refused too (a token login is a token login)
    refused_as_bad_password(dsn(jwt_proxy, org, org.password), user)
    log = jwt_proxy.log.read_text()
    assert "Traceback" not in log


def test_token_for_an_unknown_org_looks_the_same(jwt_proxy):
    from conftest import Org
    ghost = Org("jwt_ghost", "x", "pro", "jwt_ghost_db", "")
    refused_as_bad_password(dsn(jwt_proxy, ghost, token("jwt_ghost")), "token.jwt_ghost")


def test_token_login_needs_tls(jwt_proxy, make_org):
    org = make_org("jwt_hs", "pro")
    with pytest.raises(psycopg.OperationalError, match=r'token logins \(user "token.ORG"\) need TLS'):
        psycopg.connect(dsn(jwt_proxy, org, token(org.name), sslmode="disable"))


def test_role_claim_picks_the_backend_role(jwt_proxy, make_org, pg_server):
    org = make_org("jwt_role", "pro")
    with psycopg.connect(admin_dsn(pg_server, org.dbname), autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS jwt_reader")
        conn.execute("CREATE ROLE jwt_reader NOLOGIN")
        conn.execute(f"GRANT jwt_reader TO {org.name}_owner")
    with psycopg.connect(dsn(jwt_proxy, org, token(org.name, role="jwt_reader")), autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("jwt_reader",)
        assert conn.execute("SELECT current_user").fetchone() == ("jwt_reader",)  # on the next backend too
    with psycopg.connect(dsn(jwt_proxy, org, token(org.name)), autocommit=True) as conn:  # no claim: the owner
        assert conn.execute("SELECT current_user").fetchone() == (f"{org.name}_owner",)
    refused_as_bad_password(dsn(jwt_proxy, org, token(org.name, role="x; DROP")), f"token.{org.name}")


def test_psql_with_a_fresh_and_an_expired_token(jwt_proxy, make_org):
    org = make_org("jwt_psql", "pro")
    conninfo = (f"host={jwt_proxy.host} port={jwt_proxy.port} user=token.{org.name} dbname={org.dbname}"
                " sslmode=require")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    ok = subprocess.run(["psql", conninfo, "-tAc", "SELECT 7 * 6"], env=env | {"PGPASSWORD": token(org.name)},
                        capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and ok.stdout.strip() == "42", ok.stderr
    bad = subprocess.run(["psql", conninfo, "-tAc", "SELECT 1"], env=env | {"PGPASSWORD": token(org.name, ttl=-60)},
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and f'password authentication failed for user "token.{org.name}"' in bad.stderr


class _JWKSHandler(http.server.BaseHTTPRequestHandler):
    hits: list[float] = []
    body = json.dumps(JWKS).encode()

    def do_GET(self) -> None:  # noqa: N802
        type(self).hits.append(time.monotonic())
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args) -> None:
        pass


def test_jwks_url_is_fetched_in_the_background_not_per_login(migrated, make_org, tmp_path):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _JWKSHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/.well-known/jwks.json"
    p = start_proxy(migrated, tmp_path, "--workers", "2", "--jwks-url", url, "--token-login-plaintext")
    try:
        org = make_org("jwt_url", "pro")
        deadline = time.monotonic() + 10
        while len(_JWKSHandler.hits) < 2 and time.monotonic() < deadline:  # each worker reads it once at start
            time.sleep(0.05)
        fetched = len(_JWKSHandler.hits)
        assert fetched == 2
        for _ in range(6):  # plaintext allowed here by --token-login-plaintext
            with psycopg.connect(dsn(p, org, token(org.name, key=RSA_KEY, alg="RS256", kid="rsa-1"),
                                     sslmode="disable"), autocommit=True) as conn:
                conn.execute("SELECT 1")
        assert len(_JWKSHandler.hits) == fetched  # no fetch per login
        # a kid the set does not know is refused at once, and asks for one early re-read (not per login)
        for _ in range(3):
            refused_as_bad_password(dsn(p, org, token(org.name, key=RSA_KEY, alg="RS256", kid="rsa-2"),
                                        sslmode="disable"), f"token.{org.name}")
        time.sleep(0.5)
        assert len(_JWKSHandler.hits) <= fetched + 2  # at most one per worker
        # the exact error fields: 28P01, FATAL, no detail or hint, as for a wrong password
        for tok in (token(org.name, ttl=-60), token(org.name, key=FOREIGN_RSA, alg="RS256", kid="rsa-1")):
            with RawPG(p.host, p.port) as raw:
                err = first_error(raw.login(f"token.{org.name}", tok, org.dbname))
            assert err == {"S": "FATAL", "V": "FATAL", "C": "28P01",
                           "M": f'password authentication failed for user "token.{org.name}"'}, err
    finally:
        stop_proxy(p)
        srv.shutdown()
