"""TLS on both sides: clients that ask (SSLRequest) when O7s has a certificate, backends per sslmode."""

from __future__ import annotations

import datetime
import hashlib
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


# ---------------------------------------------------------------------------------------------- channel binding

import socket  # noqa: E402
import ssl  # noqa: E402
import struct  # noqa: E402

from conftest import error_fields  # noqa: E402
from o7s_cluster.pgwire.scram import ScramClient, tls_server_end_point  # noqa: E402


@pytest.mark.parametrize("channel_binding", ["require", "prefer", "disable"])
def test_psycopg_channel_binding_over_tls(tls_proxy, make_org, channel_binding):
    org = make_org("tls_client", "pro")
    with psycopg.connect(tls_proxy.dsn(org, sslmode="require", channel_binding=channel_binding),
                         autocommit=True) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("select 1").fetchone() == (1,)


def test_channel_binding_require_refuses_a_wrong_password(tls_proxy, make_org):
    org = make_org("tls_client", "pro")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(tls_proxy.dsn(org, sslmode="require", channel_binding="require", password="wrong"))


def test_plain_tcp_offers_no_plus(tls_proxy, make_org):
    org = make_org("tls_client", "pro")
    with pytest.raises(psycopg.OperationalError, match="(?i)channel binding"):
        psycopg.connect(tls_proxy.dsn(org, sslmode="disable", channel_binding="require"))
    mechanisms, _ = _raw_sasl(tls_proxy, org, tls=False)
    assert mechanisms == [b"SCRAM-SHA-256"]


def _raw_sasl(proxy, org, *, tls: bool, user: str | None = None, password: str | None = None,
              mechanism: bytes | None = None, **scram_kw) -> tuple[list[bytes], list[tuple[bytes, bytes]]]:
    """A raw client: (TLS,) startup, the SASL offer, then one exchange with ScramClient(**scram_kw);
    the offered mechanisms and every message after the offer up to ReadyForQuery or an error."""
    sock = socket.create_connection((proxy.host, proxy.port), timeout=10)
    try:
        if tls:
            sock.sendall(struct.pack("!ii", 8, 80877103))
            assert sock.recv(1) == b"S"
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            sock = ctx.wrap_socket(sock, server_hostname="proxy.local")
            if scram_kw.pop("bind_to_seen_certificate", False):
                scram_kw["channel_binding"] = tls_server_end_point(sock.getpeercert(binary_form=True))
        body = b"".join(k.encode() + b"\0" + v.encode() + b"\0"
                        for k, v in {"user": user or org.name, "database": org.dbname}.items()) + b"\0"
        sock.sendall(struct.pack("!ii", 8 + len(body), 196608) + body)

        def recv() -> tuple[bytes, bytes]:
            hdr = b""
            while len(hdr) < 5:
                hdr += sock.recv(5 - len(hdr)) or b"!" * 5
            (n,) = struct.unpack("!i", hdr[1:])
            data = b""
            while len(data) < n - 4:
                chunk = sock.recv(n - 4 - len(data))
                if not chunk:
                    break
                data += chunk
            return hdr[:1], data

        t, offer = recv()
        assert t == b"R" and offer[:4] == struct.pack("!i", 10)
        mechanisms = [m for m in offer[4:].split(b"\0") if m]
        client = ScramClient(password or org.password, **scram_kw)
        first = client.client_first()
        mech = mechanism or (b"SCRAM-SHA-256-PLUS" if first.startswith(b"p=") else b"SCRAM-SHA-256")
        sock.sendall(b"p" + struct.pack("!i", 4 + len(mech) + 1 + 4 + len(first)) + mech + b"\0"
                     + struct.pack("!i", len(first)) + first)
        seen = []
        while True:
            t, data = recv()
            seen.append((t, data))
            if t in (b"E", b"Z", b"!"):
                return mechanisms, seen
            if t == b"R" and data[:4] == struct.pack("!i", 11):
                final = client.handle_server_first(data[4:])
                sock.sendall(b"p" + struct.pack("!i", 4 + len(final)) + final)
            elif t == b"R" and data[:4] == struct.pack("!i", 12):
                client.verify_server_final(data[4:])
    finally:
        sock.close()


def _error(seen) -> dict[str, str] | None:
    return next((error_fields(d) for t, d in seen if t == b"E"), None)


def test_raw_plus_binds_to_the_certificate_the_client_saw(tls_proxy, make_org):
    org = make_org("tls_client", "pro")
    mechanisms, seen = _raw_sasl(tls_proxy, org, tls=True, bind_to_seen_certificate=True)
    assert mechanisms == [b"SCRAM-SHA-256-PLUS", b"SCRAM-SHA-256"]
    assert _error(seen) is None and seen[-1][0] == b"Z"
    # The hash O7s computed from its certificate file is the one of the certificate on the wire.
    with open(_PROXY_CERT, "rb") as f:
        der = x509.load_pem_x509_certificate(f.read()).public_bytes(serialization.Encoding.DER)
    assert tls_server_end_point(der) == hashlib.sha256(der).digest()


def test_raw_plus_with_another_certificate_is_refused(tls_proxy, make_org):
    """What a man in the middle with its own certificate gets: the client bound to that one."""
    org = make_org("tls_client", "pro")
    _, seen = _raw_sasl(tls_proxy, org, tls=True, channel_binding=hashlib.sha256(b"another certificate").digest())
    err = _error(seen)
    assert err is not None and err["C"] == "08P01" and "channel binding check failed" in err["M"]


def test_y_when_plus_was_offered_is_a_downgrade(tls_proxy, make_org):
    org = make_org("tls_client", "pro")
    _, seen = _raw_sasl(tls_proxy, org, tls=True, binding_capable=True)
    err = _error(seen)
    assert err is not None and err["C"] == "08P01" and "negotiation error" in err["M"]
    # On plain TCP -PLUS is not offered, so y is an honest answer and the login succeeds.
    _, seen = _raw_sasl(tls_proxy, org, tls=False, binding_capable=True)
    assert _error(seen) is None and seen[-1][0] == b"Z"


def test_plus_chosen_without_binding_data_is_refused(tls_proxy, make_org):
    org = make_org("tls_client", "pro")
    _, seen = _raw_sasl(tls_proxy, org, tls=True, mechanism=b"SCRAM-SHA-256-PLUS")
    err = _error(seen)
    assert err is not None and err["C"] == "08P01" and "does not include channel binding data" in err["M"]


def test_plus_for_an_unknown_org_looks_like_a_wrong_password(tls_proxy, make_org):
    org = make_org("tls_client", "pro")
    _, unknown = _raw_sasl(tls_proxy, org, tls=True, user="no_such_org_tls", bind_to_seen_certificate=True)
    _, wrong = _raw_sasl(tls_proxy, org, tls=True, password="wrong", bind_to_seen_certificate=True)
    e1, e2 = _error(unknown), _error(wrong)
    assert e1 is not None and e2 is not None
    assert (e1["C"], e2["C"]) == ("28P01", "28P01")
    assert e1["M"].replace("no_such_org_tls", "X") == e2["M"].replace(org.name, "X")


def test_channel_binding_with_a_sha384_signed_certificate(migrated, make_org, tmp_path_factory):
    """tls-server-end-point hashes with the certificate's own signature hash: libpq computes the same."""
    directory = Path(tempfile.mkdtemp(prefix="o7s-tls384-"))
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "proxy384.local")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30)).sign(key, hashes.SHA384()))
    (directory / "c.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "c.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    os.chmod(directory / "c.key", 0o600)
    p = start_proxy(migrated, tmp_path_factory.mktemp("tls384"), "--workers", "1",
                    "--tls-cert", str(directory / "c.crt"), "--tls-key", str(directory / "c.key"))
    try:
        org = make_org("tls_client", "pro")
        with psycopg.connect(p.dsn(org, sslmode="require", channel_binding="require"), autocommit=True) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
    finally:
        stop_proxy(p)
