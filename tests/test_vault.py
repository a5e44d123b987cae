"""Vault: Fernet encryption of backend DSNs, and clear errors for a missing, malformed or wrong key."""

import pytest
from cryptography.fernet import Fernet

from o7s_cluster.control_plane.vault import Vault, VaultError, generate_key


def test_round_trip_and_ciphertext_hides_plaintext():
    v = Vault(generate_key())
    secret = "host=db user=u password=hunter2-très dbname=x"
    token = v.encrypt(secret)
    assert isinstance(token, bytes) and b"hunter2" not in token
    assert v.decrypt(token) == secret
    assert v.encrypt(secret) != token  # fresh IV every time
    assert v.decrypt(memoryview(token)) == secret  # psycopg hands bytea back as bytes or memoryview


def test_generate_key_is_a_fernet_key_and_unique():
    k1, k2 = generate_key(), generate_key()
    assert k1 != k2
    Fernet(k1.encode())


@pytest.mark.parametrize("key", [None, ""])
def test_missing_key(key):
    with pytest.raises(VaultError, match="O7S_SECRET_KEY is not set"):
        Vault(key)


@pytest.mark.parametrize("key", ["short", "x" * 44, generate_key()[:-2]])
def test_malformed_key_message_does_not_echo_key(key):
    with pytest.raises(VaultError, match="malformed") as ei:
        Vault(key)
    assert key not in str(ei.value)


def test_wrong_key():
    token = Vault(generate_key()).encrypt("secret")
    with pytest.raises(VaultError, match="not the key"):
        Vault(generate_key()).decrypt(token)


def test_check_token():
    a, b = Vault(generate_key()), Vault(generate_key())
    tok = a.check_token()
    a.verify_check_token(tok)
    with pytest.raises(VaultError):
        b.verify_check_token(tok)
    with pytest.raises(VaultError):  # a valid ciphertext of something else is not a proof either
        a.verify_check_token(a.encrypt("other"))


def test_key_whitespace_tolerated():
    k = generate_key()
    assert Vault(k + "\n").decrypt(Vault(k).encrypt("x")) == "x"
