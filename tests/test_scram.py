"""SCRAM-SHA-256 (sans-IO): RFC 7677 vector, round trips, mock exchange, real PostgreSQL verifiers, fuzzing."""

from __future__ import annotations

import base64
import hashlib
import hmac as _hmac
import socket
import struct

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from o7s_cluster.pgwire.scram import (
    ScramChannelBindingError,
    ScramClient,
    ScramError,
    ScramServer,
    make_verifier,
    md5_password,
    parse_verifier,
    saslprep,
    tls_server_end_point,
)
from conftest import admin_dsn

MOCK = b"m" * 32

# RFC 7677, section 3
RFC_CLIENT_NONCE = b"rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = b"%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def _exchange(server: ScramServer, client: ScramClient) -> None:
    sf = server.handle_client_first(client.client_first())
    fin = server.handle_client_final(client.handle_server_first(sf))
    client.verify_server_final(fin)


# ---------------------------------------------------------------- RFC 7677 test vector


def test_rfc7677_server_side():
    verifier = make_verifier("pencil", salt=RFC_SALT, iterations=4096)
    srv = ScramServer(verifier, mock_secret=MOCK, username_hint="user", server_nonce=RFC_SERVER_NONCE)
    assert srv.handle_client_first(RFC_CLIENT_FIRST) == RFC_SERVER_FIRST
    assert srv.handle_client_final(RFC_CLIENT_FINAL) == RFC_SERVER_FINAL
    assert srv.done


def test_rfc7677_client_side():
    # The RFC's client sends n=user; ours sends n= (PostgreSQL style), which changes the AuthMessage,
    # so check the client side by driving it with the RFC's client-first-bare via a matching server.
    verifier = make_verifier("pencil", salt=RFC_SALT, iterations=4096)
    cli = ScramClient("pencil", client_nonce=RFC_CLIENT_NONCE)
    first = cli.client_first()
    assert first == b"n,,n=,r=rOprNGfwEbeRWgbNEkqO"
    srv = ScramServer(verifier, mock_secret=MOCK, username_hint="user", server_nonce=RFC_SERVER_NONCE)
    sf = srv.handle_client_first(first)
    assert sf == RFC_SERVER_FIRST
    final = cli.handle_server_first(sf)
    assert final.startswith(b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=")
    cli.verify_server_final(srv.handle_client_final(final))
    assert cli.done


def test_rfc7677_client_proof_matches_vector():
    """Recompute the RFC's proof with our client's primitives by monkeying only its first-bare."""
    cli = ScramClient("pencil", client_nonce=RFC_CLIENT_NONCE)
    cli._client_first_bare = b"n=user,r=rOprNGfwEbeRWgbNEkqO"  # the RFC's client names the user
    cli.client_first()
    assert cli.handle_server_first(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    cli.verify_server_final(RFC_SERVER_FINAL)


def test_verifier_format_and_parse():
    v = make_verifier("pencil", salt=RFC_SALT, iterations=4096)
    assert v.startswith("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$")
    it, salt, stored, server = parse_verifier(v)
    assert (it, salt) == (4096, RFC_SALT)
    assert len(stored) == 32 and len(server) == 32
    v2 = make_verifier("pw")
    it2, salt2, _, _ = parse_verifier(v2)
    assert it2 == 4096 and len(salt2) == 16
    assert make_verifier("pw") != v2  # random salt


@pytest.mark.parametrize(
    "bad",
    [
        "", "md5abc", "SCRAM-SHA-256$", "SCRAM-SHA-256$4096:AAAA$AAAA",
        "SCRAM-SHA-256$x:W22ZaJ0SNY7soEsUEjb6gQ==$" + "A" * 44 + ":" + "A" * 44,
        "SCRAM-SHA-256$0:W22ZaJ0SNY7soEsUEjb6gQ==$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$4096:***$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$AAAA:AAAA",
        "SCRAM-SHA-1$4096:W22ZaJ0SNY7soEsUEjb6gQ==$" + "A" * 43 + "=:" + "A" * 43 + "=",
    ],
)
def test_parse_verifier_rejects(bad):
    with pytest.raises(ValueError):
        parse_verifier(bad)


def test_md5_password():
    # md5 + md5(md5(password || user) || salt), as libpq computes it
    inner = hashlib.md5(b"secretalice").hexdigest().encode()
    expected = b"md5" + hashlib.md5(inner + b"\x01\x02\x03\x04").hexdigest().encode()
    assert md5_password("alice", "secret", b"\x01\x02\x03\x04") == expected
    assert len(expected) == 35


# ---------------------------------------------------------------- SASLprep


@pytest.mark.parametrize(
    "raw, prepped",
    [
        ("pencil", "pencil"),
        ("I\u00adX", "IX"),  # soft hyphen maps to nothing (RFC 4013 example)
        ("user", "user"),
        ("\u00aa", "a"),  # NFKC
        ("\u2168", "IX"),  # NFKC
        ("a\u00a0b", "a b"),  # non-ASCII space maps to SPACE
        ("\u0007", "\u0007"),  # ASCII: PostgreSQL's fast path leaves it alone
        ("a\u0080b", "a\u0080b"),  # prohibited control character: used unchanged
        ("\u0627\u0031", "\u0627\u0031"),  # bidi rule violated: used unchanged
        ("\u0627\u0031\u0628", "\u0627\u0031\u0628"),  # valid RandAL string
        ("\u00ad", "\u00ad"),  # empty after mapping: used unchanged
    ],
)
def test_saslprep(raw, prepped):
    assert saslprep(raw) == prepped


# ---------------------------------------------------------------- round trips and failures


@pytest.mark.parametrize("password", ["pw", "", "correct horse battery staple", "pässwörd", "I\u00adX", "a\u0080b"])
def test_round_trip(password):
    v = make_verifier(password, iterations=1024)
    _exchange(ScramServer(v, mock_secret=MOCK, username_hint="acme"), ScramClient(password))


def test_saslprep_applied_on_both_sides():
    v = make_verifier("I\u00adX", iterations=1024)
    _exchange(ScramServer(v, mock_secret=MOCK, username_hint="acme"), ScramClient("IX"))


def test_wrong_password_fails():
    v = make_verifier("right", iterations=1024)
    srv = ScramServer(v, mock_secret=MOCK, username_hint="acme")
    cli = ScramClient("wrong")
    sf = srv.handle_client_first(cli.client_first())
    with pytest.raises(ScramError, match="password authentication failed"):
        srv.handle_client_final(cli.handle_server_first(sf))
    assert not srv.done


def test_gs2_y_accepted_and_checked():
    v = make_verifier("pw", iterations=1024)
    cli = ScramClient("pw")
    first = cli.client_first()
    srv = ScramServer(v, mock_secret=MOCK, username_hint="acme")
    sf = srv.handle_client_first(b"y" + first[1:])
    final = cli.handle_server_first(sf)
    # The client used c=biws (n,,) but announced y,, — the channel-binding check must fail.
    with pytest.raises(ScramError):
        srv.handle_client_final(final)
    # With the matching c= the exchange succeeds.
    srv = ScramServer(v, mock_secret=MOCK, username_hint="acme")
    cli = ScramClient("pw")
    sf = srv.handle_client_first(b"y" + cli.client_first()[1:])
    final = cli.handle_server_first(sf)
    # Recompute with c=eSws (y,,) by hand using the verifier's keys.
    it, salt, stored, server_key = parse_verifier(v)
    salted = hashlib.pbkdf2_hmac("sha256", b"pw", salt, it)
    ck = _hmac.new(salted, b"Client Key", "sha256").digest()
    nonce = sf.split(b",")[0][2:]
    without = b"c=" + base64.b64encode(b"y,,") + b",r=" + nonce
    am = cli._client_first_bare + b"," + sf + b"," + without
    sig = _hmac.new(stored, am, "sha256").digest()
    proof = bytes(a ^ b for a, b in zip(ck, sig))
    out = srv.handle_client_final(without + b",p=" + base64.b64encode(proof))
    assert out == b"v=" + base64.b64encode(_hmac.new(server_key, am, "sha256").digest())


@pytest.mark.parametrize(
    "first, match",
    [
        (b"p=tls-server-end-point,,n=,r=abc", "without channel binding"),
        (b"n,a=admin,n=,r=abc", "authzid"),
        (b"n,,m=ext,n=,r=abc", "extension"),
        (b"x,,n=,r=abc", "GS2"),
        (b"n,,n=,r=", "nonce"),
        (b"n,,n=,r=a\x01b", "nonce"),
        (b"n,,r=abc", "n= and r="),
        (b"", "GS2"),
        (b"n,,n=,r=" + b"a" * 5000, "too long"),
    ],
)
def test_server_rejects_bad_client_first(first, match):
    srv = ScramServer(make_verifier("pw", iterations=1024), mock_secret=MOCK, username_hint="acme")
    with pytest.raises(ScramError, match=match):
        srv.handle_client_first(first)


def test_server_rejects_bad_client_final():
    v = make_verifier("pw", iterations=1024)
    for final in [
        b"c=biws,r=WRONG,p=" + base64.b64encode(b"\0" * 32),
        b"c=biws,p=" + base64.b64encode(b"\0" * 32),
        b"c=bogus!,r=x,p=AAAA",
        b"garbage",
        b"",
    ]:
        srv = ScramServer(v, mock_secret=MOCK, username_hint="acme")
        srv.handle_client_first(b"n,,n=,r=abc")
        with pytest.raises(ScramError):
            srv.handle_client_final(final)


def test_out_of_order():
    srv = ScramServer(None, mock_secret=MOCK, username_hint="x")
    with pytest.raises(ScramError):
        srv.handle_client_final(b"c=biws,r=x,p=AAAA")
    cli = ScramClient("pw")
    with pytest.raises(ScramError):
        cli.handle_server_first(b"r=x,s=AAAA,i=1")
    cli = ScramClient("pw")
    with pytest.raises(ScramError):
        cli.verify_server_final(b"v=AAAA")


# ---------------------------------------------------------------- channel binding (SCRAM-SHA-256-PLUS)

CBIND = hashlib.sha256(b"the server certificate, DER").digest()


def _plus_server(verifier: str | None = None, *, plus: bool = True, cbind: bytes | None = CBIND) -> ScramServer:
    return ScramServer(verifier if verifier is not None else make_verifier("pw", iterations=1024),
                       mock_secret=MOCK, username_hint="acme", channel_binding=cbind, plus=plus)


def test_plus_round_trip_binds_to_the_certificate_hash():
    cli = ScramClient("pw", channel_binding=CBIND)
    first = cli.client_first()
    assert first.startswith(b"p=tls-server-end-point,,n=,r=")
    srv = _plus_server()
    final = cli.handle_server_first(srv.handle_client_first(first))
    assert final.startswith(b"c=" + base64.b64encode(b"p=tls-server-end-point,," + CBIND) + b",r=")
    cli.verify_server_final(srv.handle_client_final(final))
    assert srv.done and cli.done


def test_plus_with_other_binding_data_fails_before_the_proof():
    # e.g. a man in the middle terminating TLS with its own certificate: the client hashed that one.
    cli = ScramClient("pw", channel_binding=hashlib.sha256(b"the attacker's certificate").digest())
    srv = _plus_server()
    final = cli.handle_server_first(srv.handle_client_first(cli.client_first()))
    with pytest.raises(ScramChannelBindingError, match="channel binding check failed"):
        srv.handle_client_final(final)
    assert not srv.done


def test_plus_for_an_unknown_user_fails_like_a_wrong_password():
    cli = ScramClient("pw", channel_binding=CBIND)
    srv = ScramServer(None, mock_secret=MOCK, username_hint="nobody", channel_binding=CBIND, plus=True)
    final = cli.handle_server_first(srv.handle_client_first(cli.client_first()))
    with pytest.raises(ScramError, match="password authentication failed") as info:
        srv.handle_client_final(final)
    assert not isinstance(info.value, ScramChannelBindingError)


def test_y_is_a_downgrade_when_plus_was_offered():
    # libpq sends y when it could bind but the server's list had no -PLUS: with -PLUS offered, someone removed it.
    cli = ScramClient("pw", binding_capable=True)
    first = cli.client_first()
    assert first.startswith(b"y,,")
    with pytest.raises(ScramChannelBindingError, match="negotiation error"):
        _plus_server(plus=False).handle_client_first(first)
    # Without -PLUS on offer (plain TCP) y is fine, and its c= must say y,, (eSws).
    srv = ScramServer(make_verifier("pw", iterations=1024), mock_secret=MOCK, username_hint="acme")
    final = cli.handle_server_first(srv.handle_client_first(first))
    assert final.startswith(b"c=eSws,")
    cli.verify_server_final(srv.handle_client_final(final))


def test_n_is_fine_when_plus_was_offered_but_not_chosen():
    srv = _plus_server(plus=False)
    _exchange(srv, ScramClient("pw"))
    assert srv.done


@pytest.mark.parametrize("first, match", [
    (b"n,,n=,r=abc", "does not include channel binding data"),
    (b"y,,n=,r=abc", "does not include channel binding data"),
    (b"p=tls-unique,,n=,r=abc", "unsupported SCRAM channel-binding type"),
    (b"p=tls-server-end-point,a=x,n=,r=abc", "authzid"),
    (b"p=tls-server-end-point", "GS2"),
    (b"p,,n=,r=abc", "GS2"),
])
def test_plus_chosen_needs_p_and_the_right_type(first, match):
    with pytest.raises(ScramError, match=match):
        _plus_server().handle_client_first(first)


def test_plus_final_must_carry_the_binding_data():
    header = b"p=tls-server-end-point,,"
    for c in (header, b"n,,", header + CBIND + b"x", header + CBIND[:-1]):
        srv = _plus_server()
        nonce = srv.handle_client_first(header + b"n=,r=abc").split(b",")[0][2:]
        with pytest.raises(ScramChannelBindingError, match="channel binding check failed"):
            srv.handle_client_final(b"c=" + base64.b64encode(c) + b",r=" + nonce + b",p=" + base64.b64encode(b"\0" * 32))


def test_plus_cannot_be_chosen_when_not_offered():
    with pytest.raises(ScramChannelBindingError, match="not offered"):
        ScramServer(None, mock_secret=MOCK, username_hint="acme", channel_binding=None, plus=True)


def _cert(sign_with, key=None) -> bytes:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "o7s.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, sign_with))
    return cert.public_bytes(serialization.Encoding.DER)


def test_tls_server_end_point_follows_the_signature_hash():
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    der = _cert(hashes.SHA256())
    assert tls_server_end_point(der) == hashlib.sha256(der).digest()
    der = _cert(hashes.SHA384())
    assert tls_server_end_point(der) == hashlib.sha384(der).digest()
    der = _cert(hashes.SHA512())
    assert tls_server_end_point(der) == hashlib.sha512(der).digest()
    # RFC 5929: MD5 and SHA-1 are replaced by SHA-256.
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    try:
        der = _cert(hashes.SHA1(), rsa_key)
    except Exception:  # a cryptography build that refuses to sign with SHA-1
        der = None
    if der is not None:
        assert tls_server_end_point(der) == hashlib.sha256(der).digest()
    # Ed25519 signatures have no separate hash: no binding is defined, -PLUS is not offered.
    assert tls_server_end_point(_cert(None, ed25519.Ed25519PrivateKey.generate())) is None
    assert tls_server_end_point(b"not a certificate") is None


# ---------------------------------------------------------------- mock exchange


def test_mock_exchange_fails_and_looks_the_same():
    real = ScramServer(make_verifier("pw"), mock_secret=MOCK, username_hint="acme")
    mock = ScramServer(None, mock_secret=MOCK, username_hint="nosuchorg")
    outs = []
    errs = []
    for srv in (real, mock):
        cli = ScramClient("guess", client_nonce=b"clientnonce123456789012")
        sf = srv.handle_client_first(cli.client_first())
        outs.append(sf)
        with pytest.raises(ScramError) as ei:
            srv.handle_client_final(cli.handle_server_first(sf))
        errs.append(str(ei.value))
    # Same shape: r=<client+24-char server nonce>,s=<16-byte salt>,i=4096, same error text.
    shapes = []
    for sf in outs:
        r, s, i = sf.split(b",")
        shapes.append((r[:2], len(r), len(base64.b64decode(s[2:])), i))
    assert shapes[0] == shapes[1]
    assert errs[0] == errs[1] == "password authentication failed"


def test_mock_salt_is_deterministic_per_name_and_secret():
    def salt(secret, name):
        sf = ScramServer(None, mock_secret=secret, username_hint=name).handle_client_first(b"n,,n=,r=abc")
        return sf.split(b",")[1]

    assert salt(MOCK, "ghost") == salt(MOCK, "ghost")
    assert salt(MOCK, "ghost") != salt(MOCK, "ghost2")
    assert salt(MOCK, "ghost") != salt(b"other", "ghost")


def test_mock_fails_even_with_the_right_derived_keys():
    """Nothing the client sends can pass a mock exchange."""
    srv = ScramServer(None, mock_secret=MOCK, username_hint="ghost")
    sf = srv.handle_client_first(b"n,,n=,r=abc")
    nonce = sf.split(b",")[0][2:]
    without = b"c=biws,r=" + nonce
    am = b"n=,r=abc," + sf + b"," + without
    stored = srv._stored_key
    # Forge a proof whose ClientKey hashes to StoredKey? Impossible without a preimage; use any proof.
    sig = _hmac.new(stored, am, "sha256").digest()
    with pytest.raises(ScramError, match="password authentication failed"):
        srv.handle_client_final(without + b",p=" + base64.b64encode(sig))


# ---------------------------------------------------------------- client checks


def _client_after_first(nonce=b"cnonce"):
    cli = ScramClient("pw", client_nonce=nonce)
    cli.client_first()
    return cli


@pytest.mark.parametrize(
    "server_first, match",
    [
        (b"r=OTHERxyz,s=QUJD,i=4096", "nonce"),
        (b"r=cnonce,s=QUJD,i=4096", "nonce"),  # no server part
        (b"r=cnoncexyz,s=QUJD,i=2000000", "out of range"),
        (b"r=cnoncexyz,s=QUJD,i=0", "out of range"),
        (b"r=cnoncexyz,s=QUJD,i=-1", "iteration"),
        (b"r=cnoncexyz,s=,i=4096", "salt"),
        (b"r=cnoncexyz,s=!!!!,i=4096", "base64"),
        (b"e=other-error", "other-error"),
        (b"m=x,r=cnoncexyz,s=QUJD,i=4096", "extension"),
        (b"r=cnoncexyz,i=4096", "malformed"),
    ],
)
def test_client_rejects_bad_server_first(server_first, match):
    with pytest.raises(ScramError, match=match):
        _client_after_first().handle_server_first(server_first)


def test_client_rejects_bad_server_final():
    v = make_verifier("pw", iterations=1024)
    for final in [b"v=" + base64.b64encode(b"\0" * 32), b"e=invalid-proof", b"x=1", b"v=###", b""]:
        srv = ScramServer(v, mock_secret=MOCK, username_hint="acme")
        cli = ScramClient("pw")
        cli.handle_server_first(srv.handle_client_first(cli.client_first()))
        with pytest.raises(ScramError):
            cli.verify_server_final(final)


def test_client_detects_server_without_password():
    """A server with a different verifier but echoing a signature cannot fool the client."""
    srv = ScramServer(make_verifier("other", iterations=1024), mock_secret=MOCK, username_hint="x")
    cli = ScramClient("pw")
    cli.handle_server_first(srv.handle_client_first(cli.client_first()))
    fake = b"v=" + base64.b64encode(hashlib.sha256(b"x").digest())
    with pytest.raises(ScramError, match="signature"):
        cli.verify_server_final(fake)


# ---------------------------------------------------------------- real PostgreSQL verifiers


def _pg_verifier(pg, role: str, password: str) -> str:
    with psycopg.connect(admin_dsn(pg), autocommit=True) as conn:
        conn.execute("SET password_encryption = 'scram-sha-256'")
        conn.execute(f'DROP ROLE IF EXISTS "{role}"')
        conn.execute(
            psycopg.sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                psycopg.sql.Identifier(role), psycopg.sql.Literal(password)
            )
        )
        (v,) = conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (role,)).fetchone()
    return v


PG_PASSWORDS = ["pw", "p@ss w0rd!", "pässwörd", "I\u00adX", "\u2168\u00a0x", "a\u0080b", "\u0627\u0031"]


@pytest.mark.parametrize("idx", range(len(PG_PASSWORDS)))
def test_postgres_verifiers(pg_server, idx):
    password = PG_PASSWORDS[idx]
    v = _pg_verifier(pg_server, f"scram_t{idx}", password)
    it, salt, _, _ = parse_verifier(v)
    assert it == 4096 and len(salt) == 16
    # Ours computes the identical verifier from the same salt.
    assert make_verifier(password, salt=salt, iterations=it) == v
    _exchange(ScramServer(v, mock_secret=MOCK, username_hint="x"), ScramClient(password))
    srv = ScramServer(v, mock_secret=MOCK, username_hint="x")
    cli = ScramClient(password + "x")
    with pytest.raises(ScramError):
        srv.handle_client_final(cli.handle_server_first(srv.handle_client_first(cli.client_first())))


def _recv_msg(sock):
    def exact(n):
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    hdr = exact(5)
    (ln,) = struct.unpack("!I", hdr[1:])
    return hdr[:1], exact(ln - 4)


def _pg_login_with_scram_client(pg, user: str, password: str) -> bytes:
    """Log in to a real PostgreSQL with our ScramClient over a raw socket; returns the final message type."""
    with socket.create_connection((pg.host, pg.port), timeout=10) as s:
        params = b"user\0" + user.encode() + b"\0database\0postgres\0\0"
        s.sendall(struct.pack("!II", 8 + len(params), 196608) + params)
        t, body = _recv_msg(s)
        assert t == b"R" and struct.unpack("!I", body[:4])[0] == 10, (t, body)
        assert b"SCRAM-SHA-256\0" in body[4:]
        cli = ScramClient(password)
        first = cli.client_first()
        payload = b"SCRAM-SHA-256\0" + struct.pack("!I", len(first)) + first
        s.sendall(b"p" + struct.pack("!I", 4 + len(payload)) + payload)
        t, body = _recv_msg(s)
        if t == b"E":
            return t
        assert t == b"R" and struct.unpack("!I", body[:4])[0] == 11
        final = cli.handle_server_first(body[4:])
        s.sendall(b"p" + struct.pack("!I", 4 + len(final)) + final)
        t, body = _recv_msg(s)
        if t == b"E":
            return t
        assert t == b"R" and struct.unpack("!I", body[:4])[0] == 12
        cli.verify_server_final(body[4:])
        t, body = _recv_msg(s)
        assert t == b"R" and struct.unpack("!I", body[:4])[0] == 0  # AuthenticationOk
        return t


@pytest.mark.parametrize("password", ["pw-real", "pässwörd", "I\u00adX"])
def test_scram_client_against_real_postgres(pg_server, password):
    role = "scram_client_t"
    _pg_verifier(pg_server, role, password)
    assert _pg_login_with_scram_client(pg_server, role, password) == b"R"
    assert _pg_login_with_scram_client(pg_server, role, password + "!") == b"E"


# ---------------------------------------------------------------- fuzzing

FUZZ = settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=2000)
_VERIFIER = make_verifier("pw", iterations=64)


@FUZZ
@given(st.binary(max_size=300), st.binary(max_size=300), st.booleans())
def test_fuzz_server_random_bytes(first, final, mock):
    srv = ScramServer(None if mock else _VERIFIER, mock_secret=MOCK, username_hint="fuzz")
    try:
        srv.handle_client_first(first)
        srv.handle_client_final(final)
    except ScramError:
        pass


_attr = st.builds(
    lambda k, v: k + b"=" + v,
    st.sampled_from([b"n", b"r", b"c", b"p", b"m", b"a", b"s", b"i", b"e", b"v", b"x"]),
    st.one_of(st.binary(max_size=40), st.sampled_from([b"", b"biws", b"eSws", b"AAAA", b"abc", b"4096"])),
)
_message = st.builds(lambda parts: b",".join(parts), st.lists(_attr, max_size=6))


@FUZZ
@given(st.sampled_from([b"n,,", b"y,,", b"p=x,,", b"n,a=b,", b"", b"p=tls-server-end-point,,"]), _message, _message,
       st.booleans(), st.sampled_from([None, False, True]))
def test_fuzz_server_structured(gs2, bare, final, mock, plus):
    srv = ScramServer(None if mock else _VERIFIER, mock_secret=MOCK, username_hint="fuzz",
                      channel_binding=None if plus is None else CBIND, plus=bool(plus))
    try:
        srv.handle_client_first(gs2 + bare)
    except ScramError:
        return
    try:
        srv.handle_client_final(final)
    except ScramError:
        return
    raise AssertionError("a random client-final-message passed the proof")


@FUZZ
@given(st.binary(max_size=300), st.binary(max_size=300))
def test_fuzz_client_random_bytes(server_first, server_final):
    cli = ScramClient("pw", client_nonce=b"abc")
    cli.client_first()
    try:
        cli.handle_server_first(server_first)
        cli.verify_server_final(server_final)
    except ScramError:
        pass


@FUZZ
@given(
    st.binary(max_size=20).map(lambda b: b"r=abc" + b),
    st.one_of(st.binary(max_size=30), st.just(b"QUJD")),
    st.one_of(st.integers(min_value=-5, max_value=3000).map(lambda i: str(i).encode()), st.binary(max_size=12)),
    _message,
    _message,
)
def test_fuzz_client_structured(r, s, i, extra, final):
    cli = ScramClient("pw", client_nonce=b"abc")
    cli.client_first()
    msg = r + b",s=" + s + b",i=" + i + (b"," + extra if extra else b"")
    try:
        cli.handle_server_first(msg)
    except ScramError:
        return
    try:
        cli.verify_server_final(final)
    except ScramError:
        return
    raise AssertionError("a random server-final-message passed verification")


@FUZZ
@given(st.text(max_size=30))
def test_fuzz_saslprep_and_round_trip(password):
    saslprep(password)  # never raises
    v = make_verifier(password, iterations=16)
    _exchange(ScramServer(v, mock_secret=MOCK, username_hint=password), ScramClient(password))
