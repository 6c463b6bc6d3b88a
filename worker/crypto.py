"""AES-GCM block cipher for the values the Djinn server encrypts (build keys).

The server encrypts with Go's ``gcm.Seal(nonce, nonce, plaintext, nil)``, so
the layout here is the same byte for byte: a 12-byte random nonce, the
ciphertext, then the 16-byte tag. Without ``crypto.salt`` the key is the
``crypto.block`` setting used as raw bytes, whose length picks AES-128,
AES-192 or AES-256 exactly as Go's ``aes.NewCipher`` does; with it, the key
is derived from both as later servers derive it (``derive_key``). Either way
one config works for the server and both workers.

Error messages never carry key bytes or plaintext: they end up in logs and
build output that other people read.
"""

from __future__ import annotations

import hashlib
import os

from Crypto.Cipher import AES

KEY_SIZES = (16, 24, 32)
NONCE_SIZE = 12
TAG_SIZE = 16
# The derivation of Djinn servers from late 2020 on: fixed there, so fixed here.
SALT_ITERATIONS = 4096
DERIVED_KEY_SIZE = 32


def derive_key(block: bytes, salt: bytes) -> bytes:
    """The AES-256 key a server with ``crypto.salt`` seals with.

    PBKDF2-HMAC-SHA256 of the block with the salt: the same bytes the server
    derives from the same two settings, so what it sealed opens here.
    """
    return hashlib.pbkdf2_hmac("sha256", block, salt, SALT_ITERATIONS, DERIVED_KEY_SIZE)


class CryptoError(Exception):
    """A key or ciphertext that cannot be used, phrased for the operator."""


class BlockCipher:
    """Seals and opens values with the ``crypto.block`` key."""

    def __init__(self, key: bytes) -> None:
        # Checked up front so a bad config fails at start-up, not in a build.
        if len(key) not in KEY_SIZES:
            raise CryptoError(
                f"crypto.block key is {len(key)} bytes long; it must be 16, 24 "
                "or 32 bytes (AES-128, AES-192 or AES-256)"
            )
        self._key = bytes(key)

    def encrypt(self, plaintext: bytes) -> bytes:
        """Seal with a fresh random nonce: GCM is broken by nonce reuse."""
        return _seal(self._key, os.urandom(NONCE_SIZE), plaintext)

    def decrypt(self, data: bytes) -> bytes:
        """Open a sealed value, refusing anything that does not authenticate.

        GCM without the tag check would hand back garbage for a wrong key, and
        garbage written as an SSH key fails far from the cause; so every
        failure here is one error that points at the two likely causes.
        """
        if len(data) < NONCE_SIZE + TAG_SIZE:
            raise CryptoError(
                f"cannot decrypt a {len(data)}-byte value: sealed values are at "
                f"least {NONCE_SIZE + TAG_SIZE} bytes (nonce and tag); "
                "wrong crypto.block key or tampered data"
            )
        nonce, body, tag = data[:NONCE_SIZE], data[NONCE_SIZE:-TAG_SIZE], data[-TAG_SIZE:]
        cipher = AES.new(self._key, AES.MODE_GCM, nonce=nonce, mac_len=TAG_SIZE)
        try:
            return cipher.decrypt_and_verify(body, tag)
        except ValueError:
            raise CryptoError(
                "cannot decrypt: authentication failed; "
                "wrong crypto.block key or tampered data"
            ) from None


def _seal(key: bytes, nonce: bytes, plaintext: bytes) -> bytes:
    """The whole of encryption, with the nonce passed in so tests can pin it
    to a published vector."""
    cipher = AES.new(key, AES.MODE_GCM, nonce=nonce, mac_len=TAG_SIZE)
    ciphertext, tag = cipher.encrypt_and_digest(plaintext)
    return nonce + ciphertext + tag
