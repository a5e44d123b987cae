"""Sans-IO SCRAM-SHA-256 (RFC 5802 / RFC 7677) as PostgreSQL speaks it, plus md5 password hashing.

No sockets, no trio: every function takes and returns bytes, so the state machines can be tested and
fuzzed alone.

Server side (clients authenticating to O7s)::

    srv = ScramServer(verifier_or_None, mock_secret=..., username_hint=org_name)
    server_first = srv.handle_client_first(sasl_initial_response_data)
    server_final = srv.handle_client_final(sasl_response_data)   # raises ScramError on a bad proof

Client side (O7s authenticating to a backend)::

    cli = ScramClient(password)
    first = cli.client_first()
    final = cli.handle_server_first(auth_sasl_continue_data)
    cli.verify_server_final(auth_sasl_final_data)

Channel binding (RFC 5802 section 6, RFC 5929): on a TLS connection the server offers SCRAM-SHA-256-PLUS too,
and hands ``channel_binding=`` the tls-server-end-point data of its certificate (``tls_server_end_point``); a
client that picks -PLUS must bind to exactly that (``p=tls-server-end-point``), and a client that says it could
bind but thinks the server cannot (``y``) is refused when the server did offer -PLUS: a downgrade, as PostgreSQL
refuses it.

Differences from the RFC that PostgreSQL also makes: the user name in the client-first-message is
ignored (the startup packet names the user), the password goes through SASLprep but is used unchanged
when it is not valid for SASLprep, and a user without a verifier gets a mock exchange that only fails
at the proof, so an unknown user cannot be told from a wrong password.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import stringprep
import unicodedata

__all__ = [
    "CBIND_TYPE",
    "MECHANISM",
    "MECHANISM_PLUS",
    "ScramChannelBindingError",
    "ScramClient",
    "ScramError",
    "ScramServer",
    "make_verifier",
    "md5_password",
    "parse_verifier",
    "saslprep",
    "tls_server_end_point",
]

MECHANISM = "SCRAM-SHA-256"
MECHANISM_PLUS = "SCRAM-SHA-256-PLUS"
CBIND_TYPE = b"tls-server-end-point"  # the only channel binding type PostgreSQL (and so libpq) implements

DEFAULT_ITERATIONS = 4096
SALT_LEN = 16  # PostgreSQL's SCRAM_DEFAULT_SALT_LEN
NONCE_RAW_LEN = 18  # PostgreSQL's SCRAM_RAW_NONCE_LEN; 24 characters once base64-encoded
KEY_LEN = 32  # SHA-256 output

# Caps on what we accept from the wire. Real messages are ~100 bytes.
MAX_CLIENT_FIRST = 2048
MAX_CLIENT_FINAL = 2048
MAX_SERVER_FIRST = 2048
MAX_SERVER_FINAL = 1024
MAX_NONCE = 512
MAX_SALT_B64 = 512
MAX_ITERATIONS = 1_000_000  # client side: refuse a server that asks for more work than this
MAX_VERIFIER_ITERATIONS = 10_000_000


class ScramError(Exception):
    """Any failure of a SCRAM exchange: malformed message, bad proof, server error, wrong state."""


class ScramChannelBindingError(ScramError):
    """The channel binding was refused (wrong data, wrong type, a downgrade): PostgreSQL's protocol violations.
    Raised before the proof is looked at, so it says nothing about the password or the user."""


def tls_server_end_point(cert_der: bytes) -> bytes | None:
    """RFC 5929 tls-server-end-point: the hash of the server's certificate (DER), with the certificate's signature
    hash, SHA-256 when that is MD5 or SHA-1. None when the signature has no hash (Ed25519, Ed448): no binding
    is defined for those, so -PLUS is not offered (libpq could not compute it either)."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm

    try:
        algorithm = x509.load_der_x509_certificate(cert_der).signature_hash_algorithm
    except (UnsupportedAlgorithm, ValueError):
        return None
    if algorithm is None:
        return None
    name = "sha256" if algorithm.name in ("md5", "sha1") else algorithm.name
    try:
        return hashlib.new(name, cert_der).digest()
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------------
# Primitives


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64decode(data: bytes | str, what: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ScramError(f"malformed SCRAM message: invalid base64 in {what}") from e


def _password_bytes(password: str) -> bytes:
    return saslprep(password).encode("utf-8", "surrogatepass")


def _salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", _password_bytes(password), salt, iterations)


def _keys(salted: bytes) -> tuple[bytes, bytes, bytes]:
    """(ClientKey, StoredKey, ServerKey) from SaltedPassword."""
    client_key = _hmac(salted, b"Client Key")
    return client_key, _h(client_key), _hmac(salted, b"Server Key")


def _make_nonce() -> bytes:
    return base64.b64encode(secrets.token_bytes(NONCE_RAW_LEN))


def _is_printable_nonce(nonce: bytes) -> bool:
    # RFC 5802: printable = %x21-2B / %x2D-7E (printable ASCII except ",")
    return bool(nonce) and all(0x21 <= c <= 0x7E and c != 0x2C for c in nonce)


# --------------------------------------------------------------------------------------------------
# SASLprep (RFC 4013), the way PostgreSQL's pg_saslprep() does it


def _prohibited(c: str) -> bool:
    return (
        stringprep.in_table_c12(c)
        or stringprep.in_table_c21_c22(c)
        or stringprep.in_table_c3(c)
        or stringprep.in_table_c4(c)
        or stringprep.in_table_c5(c)
        or stringprep.in_table_c6(c)
        or stringprep.in_table_c7(c)
        or stringprep.in_table_c8(c)
        or stringprep.in_table_c9(c)
        or stringprep.in_table_a1(c)  # stored strings: unassigned code points are prohibited
    )


def saslprep(password: str) -> str:
    """SASLprep a password; like PostgreSQL, return it unchanged if it is not valid for SASLprep.

    Pure-ASCII input is returned unchanged (PostgreSQL's fast path, which also lets ASCII control
    characters through).
    """
    if password.isascii():
        return password
    mapped = []
    for c in password:
        if stringprep.in_table_c12(c):
            mapped.append(" ")
        elif stringprep.in_table_b1(c):
            continue
        else:
            mapped.append(c)
    if not mapped:
        return password  # empty after mapping: prohibited, use the original
    try:
        out = unicodedata.normalize("NFKC", "".join(mapped))
    except (ValueError, UnicodeError):  # pragma: no cover - lone surrogates normalise fine in CPython
        return password
    if any(_prohibited(c) for c in out):
        return password
    if any(stringprep.in_table_d1(c) for c in out):
        if any(stringprep.in_table_d2(c) for c in out):
            return password
        if not (stringprep.in_table_d1(out[0]) and stringprep.in_table_d1(out[-1])):
            return password
    return out


# --------------------------------------------------------------------------------------------------
# Verifiers


def make_verifier(password: str, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS) -> str:
    """A SCRAM-SHA-256 verifier in PostgreSQL's `rolpassword` format.

    ``SCRAM-SHA-256$<iterations>:<base64 salt>$<base64 StoredKey>:<base64 ServerKey>``
    """
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError("iterations must be a positive integer")
    if salt is None:
        salt = secrets.token_bytes(SALT_LEN)
    if not salt:
        raise ValueError("salt must not be empty")
    _, stored_key, server_key = _keys(_salted_password(password, salt, iterations))
    return f"{MECHANISM}${iterations}:{_b64(salt)}${_b64(stored_key)}:{_b64(server_key)}"


def parse_verifier(s: str) -> tuple[int, bytes, bytes, bytes]:
    """(iterations, salt, stored_key, server_key) from a verifier; ValueError if it is not one."""
    if not isinstance(s, str):
        raise ValueError("verifier must be a string")
    parts = s.split("$")
    if len(parts) != 3 or parts[0] != MECHANISM:
        raise ValueError("not a SCRAM-SHA-256 verifier")
    iter_salt = parts[1].split(":")
    keys = parts[2].split(":")
    if len(iter_salt) != 2 or len(keys) != 2:
        raise ValueError("malformed SCRAM-SHA-256 verifier")
    it_s, salt_s = iter_salt
    if not it_s.isascii() or not it_s.isdigit() or len(it_s) > 9:
        raise ValueError("malformed iteration count in SCRAM-SHA-256 verifier")
    iterations = int(it_s)
    if not 1 <= iterations <= MAX_VERIFIER_ITERATIONS:
        raise ValueError("iteration count out of range in SCRAM-SHA-256 verifier")
    try:
        salt = base64.b64decode(salt_s, validate=True)
        stored_key = base64.b64decode(keys[0], validate=True)
        server_key = base64.b64decode(keys[1], validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError("invalid base64 in SCRAM-SHA-256 verifier") from e
    if not salt:
        raise ValueError("empty salt in SCRAM-SHA-256 verifier")
    if len(stored_key) != KEY_LEN or len(server_key) != KEY_LEN:
        raise ValueError("wrong key length in SCRAM-SHA-256 verifier")
    return iterations, salt, stored_key, server_key


def check_password(verifier: str | None, password: str) -> bool:
    """Whether a cleartext password (Redis's AUTH) matches a SCRAM verifier: derive StoredKey with the
    verifier's salt and iterations and compare in constant time. Without a verifier (unknown org) the same
    work is done against a throwaway one, so the answer's timing tells nobody which orgs exist."""
    try:
        iterations, salt, stored_key, _ = parse_verifier(verifier) if verifier else (DEFAULT_ITERATIONS, b"x" * SALT_LEN,
                                                                                      b"", b"")
    except ValueError:
        return False
    try:
        _, derived, _ = _keys(_salted_password(password, salt, iterations))
    except (ValueError, UnicodeError):
        return False
    return bool(stored_key) and hmac.compare_digest(derived, stored_key)


# --------------------------------------------------------------------------------------------------
# md5 (backend auth with AuthenticationMD5Password)


def md5_password(user: str, password: str, salt: bytes) -> bytes:
    """The PasswordMessage payload (without its NUL) for AuthenticationMD5Password."""
    inner = hashlib.md5(password.encode("utf-8") + user.encode("utf-8")).hexdigest()
    return b"md5" + hashlib.md5(inner.encode("ascii") + salt).hexdigest().encode("ascii")


# --------------------------------------------------------------------------------------------------
# Message parsing helpers


def _split_attrs(msg: bytes) -> list[tuple[bytes, bytes]]:
    """Split `a=...,b=...` into [(b"a", b"..."), ...]; ScramError if any part is not `x=value`."""
    out = []
    for part in msg.split(b","):
        if len(part) < 2 or part[1:2] != b"=" or not (0x41 <= part[0] <= 0x5A or 0x61 <= part[0] <= 0x7A):
            raise ScramError("malformed SCRAM message: expected attribute=value")
        out.append((part[0:1], part[2:]))
    return out


# --------------------------------------------------------------------------------------------------
# Server


class _Exchange:
    """What both sides of an exchange share: a state, and the checks every incoming message passes."""

    _state: str

    @property
    def done(self) -> bool:
        return self._state == "done"

    def _fail(self, msg: str) -> ScramError:
        self._state = "failed"
        return ScramError(msg)

    def _fail_binding(self, msg: str) -> ScramError:
        self._state = "failed"
        return ScramChannelBindingError(msg)

    def _accept(self, data: object, state: str, what: str, limit: int) -> bytes:
        """The common checks of every incoming SCRAM message: order, type, size."""
        if self._state != state:
            raise self._fail(f"SCRAM {what} out of order")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise self._fail("malformed SCRAM message")
        data = bytes(data)
        if len(data) > limit:
            raise self._fail(f"SCRAM {what} too long")
        return data


class ScramServer(_Exchange):
    """Server side of SCRAM-SHA-256, one exchange per instance.

    ``verifier=None`` runs a mock exchange (unknown user): the server-first-message has the same
    shape, with a salt derived from HMAC(mock_secret, username_hint), and the exchange always fails
    at the proof with the same error as a wrong password.
    """

    AUTH_FAILED = "password authentication failed"

    def __init__(
        self,
        verifier: str | None,
        *,
        mock_secret: bytes,
        username_hint: str,
        server_nonce: bytes | None = None,
        channel_binding: bytes | None = None,
        plus: bool = False,
    ) -> None:
        """`channel_binding`: this connection's tls-server-end-point data when the server offered -PLUS (None: it
        did not); `plus`: the client chose SCRAM-SHA-256-PLUS."""
        if plus and channel_binding is None:
            raise ScramChannelBindingError("SCRAM-SHA-256-PLUS was not offered on this connection")
        self._cbind_data = channel_binding
        self._plus = plus
        self._doomed = verifier is None
        if verifier is None:
            hint = username_hint.encode("utf-8", "surrogatepass")
            self._iterations = DEFAULT_ITERATIONS
            self._salt = _hmac(mock_secret, b"o7s-scram-mock-salt\x00" + hint)[:SALT_LEN]
            self._stored_key = _hmac(mock_secret, b"o7s-scram-mock-stored\x00" + hint)
            self._server_key = _hmac(mock_secret, b"o7s-scram-mock-server\x00" + hint)
        else:
            try:
                self._iterations, self._salt, self._stored_key, self._server_key = parse_verifier(verifier)
            except ValueError as e:
                raise ScramError(f"unusable SCRAM verifier: {e}") from e
        self._server_nonce = server_nonce if server_nonce is not None else _make_nonce()
        if not _is_printable_nonce(self._server_nonce):
            raise ValueError("server nonce must be printable ASCII without ','")
        self._state = "first"
        self._gs2_header = b""
        self._client_first_bare = b""
        self._server_first = b""
        self._nonce = b""

    def handle_client_first(self, data: bytes) -> bytes:
        """Parse the client-first-message (SASLInitialResponse data); return the server-first-message."""
        data = self._accept(data, "first", "client-first-message", MAX_CLIENT_FIRST)
        # gs2-header = gs2-cbind-flag "," [ authzid ] ","  with  gs2-cbind-flag = "p=" cb-name / "n" / "y"
        flag = data[:1]
        if flag == b"p":
            if not self._plus:
                raise self._fail_binding("the client selected SCRAM-SHA-256 without channel binding, but the"
                                         " SCRAM message includes channel binding data")
            end = data.find(b",", 0, 64)
            if data[1:2] != b"=" or end < 0:
                raise self._fail("malformed SCRAM message: invalid GS2 header")
            if data[2:end] != CBIND_TYPE:
                raise self._fail_binding("unsupported SCRAM channel-binding type (only tls-server-end-point)")
        elif flag in (b"n", b"y"):
            end = 1
            if self._plus:
                raise self._fail_binding("the client selected SCRAM-SHA-256-PLUS, but the SCRAM message does not"
                                         " include channel binding data")
            if flag == b"y" and self._cbind_data is not None:
                # The client could bind but believes the server cannot: someone removed -PLUS from the offer.
                raise self._fail_binding("SCRAM channel binding negotiation error: the client supports channel"
                                         " binding but thinks the server does not, yet this server does")
        else:
            raise self._fail("malformed SCRAM message: invalid GS2 header")
        if data[end:end + 1] != b",":
            raise self._fail("malformed SCRAM message: invalid GS2 header")
        if data[end + 1:end + 3] == b"a=":
            raise self._fail("SCRAM authorization identity (authzid) is not supported")
        if data[end + 1:end + 2] != b",":
            raise self._fail("malformed SCRAM message: invalid GS2 header")
        self._gs2_header = data[:end + 2]
        bare = data[end + 2:]
        attrs = _split_attrs(bare)
        if attrs[0][0] == b"m":
            raise self._fail("SCRAM mandatory extensions are not supported")
        if attrs[0][0] != b"n" or len(attrs) < 2 or attrs[1][0] != b"r":
            raise self._fail("malformed SCRAM message: expected n= and r= attributes")
        client_nonce = attrs[1][1]
        if len(client_nonce) > MAX_NONCE or not _is_printable_nonce(client_nonce):
            raise self._fail("malformed SCRAM message: invalid client nonce")
        # Further attributes are extensions, ignored as PostgreSQL does.
        self._client_first_bare = bare
        self._nonce = client_nonce + self._server_nonce
        self._server_first = (
            b"r=" + self._nonce + b",s=" + base64.b64encode(self._salt) + b",i=" + str(self._iterations).encode()
        )
        self._state = "final"
        return self._server_first

    def handle_client_final(self, data: bytes) -> bytes:
        """Verify the client-final-message (SASLResponse data); return the server-final-message."""
        data = self._accept(data, "final", "client-final-message", MAX_CLIENT_FINAL)
        attrs = _split_attrs(data)
        if len(attrs) < 3 or attrs[0][0] != b"c" or attrs[1][0] != b"r" or attrs[-1][0] != b"p":
            raise self._fail("malformed SCRAM message: expected c=, r= and p= attributes")
        if any(k == b"p" for k, _ in attrs[:-1]):
            raise self._fail("malformed SCRAM message: proof must be the last attribute")
        cbind = _b64decode(attrs[0][1], "channel binding")
        expected = self._gs2_header + (self._cbind_data or b"") if self._plus else self._gs2_header
        if not hmac.compare_digest(cbind, expected):
            raise self._fail_binding("SCRAM channel binding check failed")
        if not hmac.compare_digest(attrs[1][1], self._nonce):
            raise self._fail("SCRAM nonce mismatch")
        proof = _b64decode(attrs[-1][1], "proof")
        if len(proof) != KEY_LEN:
            raise self._fail("malformed SCRAM message: wrong proof length")
        without_proof = data[: data.rindex(b",p=")]
        auth_message = self._client_first_bare + b"," + self._server_first + b"," + without_proof
        client_signature = _hmac(self._stored_key, auth_message)
        client_key = _xor(proof, client_signature)
        ok = hmac.compare_digest(_h(client_key), self._stored_key)
        if not ok or self._doomed:
            raise self._fail(self.AUTH_FAILED)
        self._state = "done"
        return b"v=" + base64.b64encode(_hmac(self._server_key, auth_message))


# --------------------------------------------------------------------------------------------------
# Client


class ScramClient(_Exchange):
    """Client side of SCRAM-SHA-256, as libpq does it.

    ``channel_binding``: bind to this tls-server-end-point data (SCRAM-SHA-256-PLUS, ``p=``); ``binding_capable``
    without it: the client could bind but the server did not offer -PLUS (``y``, libpq's channel_binding=prefer
    over TLS). Neither: ``n``.
    """

    def __init__(self, password: str, *, client_nonce: bytes | None = None, channel_binding: bytes | None = None,
                 binding_capable: bool = False) -> None:
        self._password = password
        self._client_nonce = client_nonce if client_nonce is not None else _make_nonce()
        if not _is_printable_nonce(self._client_nonce):
            raise ValueError("client nonce must be printable ASCII without ','")
        if channel_binding is not None:
            self._gs2_header = b"p=" + CBIND_TYPE + b",,"
            self._cbind = self._gs2_header + channel_binding
        else:
            self._gs2_header = b"y,," if binding_capable else b"n,,"
            self._cbind = self._gs2_header
        self._state = "start"
        self._client_first_bare = b"n=,r=" + self._client_nonce
        self._server_signature = b""

    def _check_server_error(self, data: bytes) -> None:
        if data.startswith(b"e="):
            raise self._fail(f"SCRAM error from server: {data[2:200].decode('ascii', 'replace')}")

    def client_first(self) -> bytes:
        if self._state != "start":
            raise self._fail("SCRAM client-first-message already sent")
        self._state = "first_sent"
        return self._gs2_header + self._client_first_bare

    def handle_server_first(self, data: bytes) -> bytes:
        """Parse the server-first-message (AuthenticationSASLContinue); return the client-final-message."""
        data = self._accept(data, "first_sent", "server-first-message", MAX_SERVER_FIRST)
        self._check_server_error(data)
        attrs = _split_attrs(data)
        if attrs[0][0] == b"m":
            raise self._fail("SCRAM mandatory extensions are not supported")
        if len(attrs) < 3 or [k for k, _ in attrs[:3]] != [b"r", b"s", b"i"]:
            raise self._fail("malformed SCRAM server-first-message")
        nonce, salt_b64, iter_s = attrs[0][1], attrs[1][1], attrs[2][1]
        if (
            len(nonce) > MAX_NONCE
            or not _is_printable_nonce(nonce)
            or not nonce.startswith(self._client_nonce)
            or len(nonce) == len(self._client_nonce)
        ):
            raise self._fail("SCRAM server nonce is invalid")
        if len(salt_b64) > MAX_SALT_B64:
            raise self._fail("SCRAM salt too long")
        salt = _b64decode(salt_b64, "salt")
        if not salt:
            raise self._fail("SCRAM salt is empty")
        if not iter_s.isdigit() or len(iter_s) > 9:
            raise self._fail("malformed SCRAM iteration count")
        iterations = int(iter_s)
        if not 1 <= iterations <= MAX_ITERATIONS:
            raise self._fail(f"SCRAM iteration count {iterations} out of range")
        salted = _salted_password(self._password, salt, iterations)
        client_key, stored_key, server_key = _keys(salted)
        without_proof = b"c=" + base64.b64encode(self._cbind) + b",r=" + nonce  # c=biws for plain "n,,"
        auth_message = self._client_first_bare + b"," + data + b"," + without_proof
        proof = _xor(client_key, _hmac(stored_key, auth_message))
        self._server_signature = _hmac(server_key, auth_message)
        self._state = "final_sent"
        return without_proof + b",p=" + base64.b64encode(proof)

    def verify_server_final(self, data: bytes) -> None:
        """Check the server-final-message (AuthenticationSASLFinal); ScramError if it is wrong."""
        data = self._accept(data, "final_sent", "server-final-message", MAX_SERVER_FINAL)
        self._check_server_error(data)
        if not data.startswith(b"v="):
            raise self._fail("malformed SCRAM server-final-message")
        value = data[2:].split(b",", 1)[0]  # extensions after v= are ignored
        signature = _b64decode(value, "server signature")
        if not hmac.compare_digest(signature, self._server_signature):
            raise self._fail("SCRAM server signature mismatch: the server does not know the password")
        self._state = "done"
