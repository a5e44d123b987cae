"""TLS on both sides: clients that ask (SSLRequest) when O7s has a certificate, backends per sslmode."""

from __future__ import annotations

import datetime
import os
import tempfile
from pathlib import Path

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pytest_postgresql import factories

from conftest import _HBA_FILE, _pg_ctl, create_backend_db, run_o7s, start_proxy, stop_proxy


def _self_signed(directory: Path, name: str) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    return str(cert_path), str(key_path)


_CERTS = Path(tempfile.mkdtemp(prefix="o7s-tls-"))
_PG_CERT, _PG_KEY = _self_signed(_CERTS, "localhost")
_PROXY_CERT, _PROXY_KEY = _self_signed(_CERTS, "proxy.local")

pg_tls = factories.postgresql_proc(
    executable=_pg_ctl(), host="127.0.0.1", port=None,
    postgres_options=f"-c hba_file={_HBA_FILE} -c ssl=on -c ssl_cert_file={_PG_CERT} -c ssl_key_file={_PG_KEY}",
)


@pytest.fixture(scope="module")
def tls_proxy(migrated, tmp_path_factory):
    p = start_proxy(migrated, tmp_path_factory.mktemp("tls"), "--tls-cert", _PROXY_CERT, "--tls-key", _PROXY_KEY)
    yield p
    stop_proxy(p)


def test_client_tls_when_asked(tls_proxy, make_org):
    org = make_org("tls_client", "pro")
    with psycopg.connect(tls_proxy.dsn(org, sslmode="require"), autocommit=True) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("select 40 + 2").fetchone() == (42,)


def test_client_without_tls_still_served_when_proxy_has_a_certificate(tls_proxy, make_org):
    org = make_org("tls_client", "pro")
    with psycopg.connect(tls_proxy.dsn(org, sslmode="disable"), autocommit=True) as conn:
        assert not conn.pgconn.ssl_in_use
        assert conn.execute("select 1").fetchone() == (1,)


def test_require_fails_clearly_without_a_proxy_certificate(proxy, make_org):
    org = make_org("tls_client", "pro")
    with pytest.raises(psycopg.OperationalError, match="(?i)ssl|tls"):
        psycopg.connect(proxy.dsn(org, sslmode="require"))
    with psycopg.connect(proxy.dsn(org, sslmode="prefer"), autocommit=True) as conn:
        assert not conn.pgconn.ssl_in_use


@pytest.mark.parametrize("sslmode, encrypted", [("require", True), ("prefer", True), ("disable", False)])
def test_backend_tls_follows_the_dsn_sslmode(pg_tls, proxy, migrated, sslmode, encrypted):
    name = f"tlsb_{sslmode}"
    dsn = create_backend_db(pg_tls, f"{name}_db", f"{name}_owner", "backend-pw") + f"?sslmode={sslmode}"
    run_o7s(migrated, "org", "create", name, "--tier", "pro", "--backend", dsn, "--password", "org-pw")
    conninfo = (f"host={proxy.host} port={proxy.port} user={name} password=org-pw "
                f"dbname={name}_db sslmode=disable")
    with psycopg.connect(conninfo, autocommit=True) as conn:
        row = conn.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()").fetchone()
    assert row == (encrypted,)


def test_backend_verify_full_refuses_an_untrusted_certificate(pg_tls, proxy, migrated):
    name = "tlsb_verify"
    dsn = create_backend_db(pg_tls, f"{name}_db", f"{name}_owner", "backend-pw") + "?sslmode=verify-full"
    run_o7s(migrated, "org", "create", name, "--tier", "pro", "--backend", dsn, "--password", "org-pw")
    conninfo = f"host={proxy.host} port={proxy.port} user={name} password=org-pw dbname={name}_db sslmode=disable"
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(conninfo)
    text = str(info.value)
    assert f'database "{name}_db"' in text
    assert "backend-pw" not in text and str(pg_tls.port) not in text
