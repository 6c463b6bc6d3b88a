"""AES-GCM compatibility with the Go server's sealed values."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from djinn_worker.crypto import BlockCipher, CryptoError, _seal, derive_key

# McGrew & Viega, "The Galois/Counter Mode of Operation (GCM)", test cases 3,
# 9 and 15 (96-bit IV, no additional data), one per AES key size.
_PLAINTEXT = bytes.fromhex(
    "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
    "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255"
)
_NONCE = bytes.fromhex("cafebabefacedbaddecaf888")
VECTORS = [
    pytest.param(
        "feffe9928665731c6d6a8f9467308308",
        "42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e"
        "21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091473f5985",
        "4d5c2af327cd64a62cf35abd2ba6fab4",
        id="case3-aes128",
    ),
    pytest.param(
        "feffe9928665731c6d6a8f9467308308feffe9928665731c",
        "3980ca0b3c00e841eb06fac4872a2757859e1ceaa6efd984628593b40ca1e19c"
        "7d773d00c144c525ac619d18c84a3f4718e2448b2fe324d9ccda2710acade256",
        "9924a7c8587336bfb118024db8674a14",
        id="case9-aes192",
    ),
    pytest.param(
        "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308",
        "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
        "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662898015ad",
        "b094dac5d93471bdec1a502270e3cc6c",
        id="case15-aes256",
    ),
]

KEY = b"0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("key_hex, ciphertext_hex, tag_hex", VECTORS)
def test_known_answer(key_hex: str, ciphertext_hex: str, tag_hex: str) -> None:
    key = bytes.fromhex(key_hex)
    sealed = _NONCE + bytes.fromhex(ciphertext_hex) + bytes.fromhex(tag_hex)
    assert _seal(key, _NONCE, _PLAINTEXT) == sealed
    assert BlockCipher(key).decrypt(sealed) == _PLAINTEXT


@pytest.mark.parametrize("size", [16, 24, 32])
def test_round_trip(size: int) -> None:
    cipher = BlockCipher(KEY[:size])
    secret = b"-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n"
    sealed = cipher.encrypt(secret)
    assert len(sealed) == 12 + len(secret) + 16
    assert cipher.decrypt(sealed) == secret


def test_empty_plaintext_round_trips() -> None:
    cipher = BlockCipher(KEY)
    assert cipher.decrypt(cipher.encrypt(b"")) == b""


def test_nonces_are_fresh() -> None:
    cipher = BlockCipher(KEY)
    assert cipher.encrypt(b"same")[:12] != cipher.encrypt(b"same")[:12]


def test_wrong_key_is_refused() -> None:
    sealed = BlockCipher(KEY).encrypt(b"secret")
    with pytest.raises(CryptoError, match="wrong crypto.block key or tampered data"):
        BlockCipher(b"fedcba9876543210fedcba9876543210").decrypt(sealed)


@pytest.mark.parametrize("position", [0, 12, -1])
def test_flipped_byte_is_refused(position: int) -> None:
    """Nonce, ciphertext and tag are all covered by authentication."""
    sealed = bytearray(BlockCipher(KEY).encrypt(b"secret value"))
    sealed[position] ^= 0x01
    with pytest.raises(CryptoError, match="wrong crypto.block key or tampered data"):
        BlockCipher(KEY).decrypt(bytes(sealed))


@pytest.mark.parametrize("length", [0, 11, 27])
def test_too_short_is_refused(length: int) -> None:
    with pytest.raises(CryptoError, match="wrong crypto.block key or tampered data"):
        BlockCipher(KEY).decrypt(b"\x00" * length)


@pytest.mark.parametrize("size", [0, 15, 17, 31, 33, 64])
def test_bad_key_length_is_refused(size: int) -> None:
    with pytest.raises(CryptoError, match="16, 24 or 32 bytes") as caught:
        BlockCipher(b"k" * size)
    assert str(size) in str(caught.value)


def test_errors_carry_no_key_or_plaintext() -> None:
    key = b"SECRETKEYsecretkeySECRETKEYsecre"
    plaintext = b"PLAINTEXT-MARKER"
    sealed = BlockCipher(key).encrypt(plaintext)
    messages = []
    for attempt in (
        lambda: BlockCipher(key[:20]),
        lambda: BlockCipher(key).decrypt(sealed[:-1] + bytes([sealed[-1] ^ 1])),
        lambda: BlockCipher(key).decrypt(sealed[:10]),
        lambda: BlockCipher(key[::-1]).decrypt(sealed),
    ):
        with pytest.raises(CryptoError) as caught:
            attempt()
        messages.append(str(caught.value))
    for message in messages:
        for secret in (key, key[:20], key[::-1], plaintext):
            assert secret.decode() not in message
            assert secret.hex() not in message
            assert repr(secret) not in message


def test_derived_key_known_answer() -> None:
    """The published PBKDF2-HMAC-SHA256 vector for P="password", S="salt",
    c=4096, dkLen=32 (the RFC 6070 inputs with SHA-256; `openssl kdf -keylen 32
    -kdfopt digest:SHA256 -kdfopt pass:password -kdfopt salt:salt -kdfopt
    iter:4096 PBKDF2` prints the same bytes)."""
    assert derive_key(b"password", b"salt") == bytes.fromhex(
        "c5e478d59288c841aa530db6845c4c8d962893a001ce4e11a4963873aa98134a")


@pytest.mark.parametrize("block, salt", [
    (b"0123456789abcdef0123456789abcdef", b"a-long-random-salt-from-djinn.conf"),
    (b"short", b"s"),
    ("bl\u00f6ck \u2603".encode(), b"\x00\xff"),
])
def test_derived_key_matches_another_implementation(block: bytes, salt: bytes) -> None:
    kdf = PBKDF2HMAC(algorithm=hashes.SHA256(), length=32, salt=salt, iterations=4096)
    assert derive_key(block, salt) == kdf.derive(block)


def test_derived_key_opens_what_it_sealed_and_differs_from_the_block() -> None:
    block = b"0123456789abcdef0123456789abcdef"
    key = derive_key(block, b"salt")
    assert len(key) == 32 and key != block
    sealed = BlockCipher(key).encrypt(b"secret")
    assert BlockCipher(derive_key(block, b"salt")).decrypt(sealed) == b"secret"
    with pytest.raises(CryptoError):
        BlockCipher(block).decrypt(sealed)
