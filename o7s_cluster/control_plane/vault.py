"""Backend DSNs are encrypted at rest (Fernet) so a dump of the control plane leaks no backend password."""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken

# Stored encrypted in platform.secret_key_check: decrypting it proves the key is the one in use.
KEY_CHECK_TOKEN = "o7s-secret-key-check-v1"


class VaultError(Exception):
    """A missing, malformed or wrong O7S_SECRET_KEY; the message never contains the key."""


def generate_key() -> str:
    return Fernet.generate_key().decode()


class Vault:
    def __init__(self, key: str | None) -> None:
        if not key:
            raise VaultError("O7S_SECRET_KEY is not set (create one with `o7s keygen`)")
        try:
            self._fernet = Fernet(key.strip().encode())
        except (ValueError, TypeError):
            raise VaultError(
                "O7S_SECRET_KEY is malformed: expected 32 url-safe base64-encoded bytes (see `o7s keygen`)"
            ) from None

    def encrypt(self, plaintext: str) -> bytes:
        return self._fernet.encrypt(plaintext.encode())

    def decrypt(self, token: bytes) -> str:
        try:
            return self._fernet.decrypt(bytes(token)).decode()
        except InvalidToken:
            raise VaultError(
                "O7S_SECRET_KEY is not the key these secrets were encrypted with"
            ) from None

    def check_token(self) -> bytes:
        """A fresh encryption of the known token, for platform.secret_key_check."""
        return self.encrypt(KEY_CHECK_TOKEN)

    def verify_check_token(self, token: bytes) -> None:
        if self.decrypt(token) != KEY_CHECK_TOKEN:
            raise VaultError("O7S_SECRET_KEY is not the key these secrets were encrypted with")
