"""AES-GCM block cipher for the values the Djinn server encrypts (build keys).

The server encrypts with Go's ``gcm.Seal(nonce, nonce, plaintext, nil)``, so
the layout here is the same byte for byte: a 12-byte random nonce, the
ciphertext, then the 16-byte tag. The key is the ``crypto.block`` setting
used as raw bytes, whose length picks AES-128, AES-192 or AES-256 exactly as
Go's ``aes.NewCipher`` does, so one config value works for both workers.

Error messages never carry key bytes or plaintext: they end up in logs and
build output that other people read.
"""

from __future__ import annotations

import os

from Crypto.Cipher import AES

KEY_SIZES = (16, 24, 32)
NONCE_SIZE = 12
TAG_SIZE = 16


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
