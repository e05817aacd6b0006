"""The marketplace session cipher (docs: ../shared/NODE_PROTOCOL.md §1), from well-kept libraries.

An encrypted session begins with an ``encrypted_session_init``: the client's ephemeral secp256k1
key and the host key agree on a point (ECDH), whose raw X coordinate goes through HKDF-SHA256
(32 zero bytes of salt, empty info) to the key of an XChaCha20-Poly1305 box holding the session
key. The client signs, with its static key, SHA-256 of the ``E2EEv1|...`` context (not of the
ciphertext); recovering that signature names the client. Every later message and every reply is
an XChaCha20-Poly1305 box under the session key, with its own nonce and an AAD that says what it
is (``message_<n>``, ``chunk_<i>``, ``encrypted_response_final``).

Primitives come from libraries, never from here: coincurve (libsecp256k1: ECDH, recoverable
signatures, low-S RFC 6979 signing), cryptography (HKDF) and PyNaCl (libsodium's
XChaCha20-Poly1305). This module only fixes the protocol's choices. Keys and plaintexts never
appear in an exception's message.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import coincurve
import nacl.bindings
import nacl.exceptions
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from eth_utils import keccak

KEY_BYTES = 32
NONCE_BYTES = 24
SIGNATURE_BYTES = 65  # r || s || v, v the recovery id (0/1; 27/28 accepted)
HKDF_SALT = bytes(32)  # the SDK's 32 zero bytes; RFC 5869's default for no salt is the same
E2EE_CONTEXT = b"E2EEv1"
FINAL_RESPONSE_AAD = b"encrypted_response_final"


class SessionCryptoError(ValueError):
    """A key, nonce, signature or box that does not hold; the message says which, never what."""


class DecryptionFailed(SessionCryptoError):
    """The box does not open under this key, nonce and AAD: tampered, or for someone else."""


def _public_key(raw: bytes) -> coincurve.PublicKey:
    try:
        return coincurve.PublicKey(raw)
    except (ValueError, TypeError) as exc:
        raise SessionCryptoError("not a secp256k1 public key (33 or 65 bytes)") from exc


@dataclass(frozen=True, slots=True, repr=False)
class HostKey:
    """The host's secp256k1 key: the one it claims with on-chain, and the sessions' ECDH key."""

    private_key: bytes

    def __post_init__(self) -> None:
        if len(self.private_key) != KEY_BYTES:
            raise SessionCryptoError("a host key is 32 bytes")
        try:
            coincurve.PrivateKey(self.private_key)
        except ValueError as exc:
            raise SessionCryptoError("not a valid secp256k1 private key") from exc

    def __repr__(self) -> str:  # never the key
        return f"HostKey({self.address})"

    @property
    def public_key(self) -> bytes:
        """Compressed, 33 bytes (what the SDK encrypts to)."""
        return coincurve.PrivateKey(self.private_key).public_key.format(compressed=True)

    @property
    def address(self) -> str:
        return address_of(coincurve.PrivateKey(self.private_key).public_key)

    def shared_x(self, peer_public_key: bytes) -> bytes:
        """ECDH with ``peer_public_key``: the shared point's raw 32-byte X coordinate (unhashed,
        as the SDK and the node use it)."""
        point = _public_key(peer_public_key).multiply(self.private_key)
        return point.format(compressed=True)[1:]

    def sign_digest(self, digest: bytes) -> tuple[bytes, int]:
        """A low-S RFC 6979 signature of the 32-byte ``digest`` as given (no further hashing):
        compact ``r || s`` and the recovery id."""
        if len(digest) != 32:
            raise SessionCryptoError("a digest is 32 bytes")
        signature = coincurve.PrivateKey(self.private_key).sign_recoverable(digest, hasher=None)
        return signature[:64], signature[64]


def address_of(public_key: coincurve.PublicKey) -> str:
    """The Ethereum address of a public key, as ``0x`` + 40 lowercase hex digits."""
    return "0x" + keccak(public_key.format(compressed=False)[1:])[-20:].hex()


def init_key(shared_x: bytes) -> bytes:
    """The init box's key: HKDF-SHA256 of the ECDH X coordinate, 32 zero bytes of salt, no info."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=HKDF_SALT, info=b"").derive(
        shared_x
    )


def _check_box(key: bytes, nonce: bytes) -> None:
    if len(key) != KEY_BYTES:
        raise SessionCryptoError("a session key is 32 bytes")
    if len(nonce) != NONCE_BYTES:
        raise SessionCryptoError("a nonce is 24 bytes")


def seal(
    key: bytes, plaintext: bytes, aad: bytes, nonce: bytes | None = None
) -> tuple[bytes, bytes]:
    """XChaCha20-Poly1305: ``(nonce, ciphertext || tag)``, a fresh random nonce unless given."""
    nonce = os.urandom(NONCE_BYTES) if nonce is None else nonce
    _check_box(key, nonce)
    box = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, aad, nonce, key)
    return nonce, box


def open_box(key: bytes, nonce: bytes, box: bytes, aad: bytes) -> bytes:
    """The plaintext of an XChaCha20-Poly1305 ``ciphertext || tag`` (or DecryptionFailed)."""
    _check_box(key, nonce)
    try:
        return nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(box, aad, nonce, key)
    except (nacl.exceptions.CryptoError, ValueError, TypeError) as exc:
        raise DecryptionFailed("the ciphertext does not open with this session's key") from exc


def e2ee_digest(
    ephemeral_public_key: bytes,
    recipient_public_key: bytes,
    nonce: bytes,
    *,
    salt: bytes = HKDF_SALT,
    info: bytes = b"",
    aad: bytes = b"",
) -> bytes:
    """What the SDK's client signs: SHA-256 of ``E2EEv1|eph|recipient|salt|nonce|info[|aad]``
    (the ``|`` after the nonce stands even though info is empty)."""
    parts = [E2EE_CONTEXT, ephemeral_public_key, recipient_public_key, salt, nonce, info]
    if aad:
        parts.append(aad)
    return hashlib.sha256(b"|".join(parts)).digest()


def recover_address(digest: bytes, signature: bytes) -> str:
    """The address whose key made ``signature`` (r || s || v) over the 32-byte ``digest``."""
    if len(digest) != 32:
        raise SessionCryptoError("a digest is 32 bytes")
    if len(signature) != SIGNATURE_BYTES:
        raise SessionCryptoError("a signature is 65 bytes: r, s and the recovery id")
    v = signature[64]
    recid = v - 27 if v >= 27 else v
    if recid not in (0, 1, 2, 3):
        raise SessionCryptoError("the signature's recovery id is not 0-3 (or 27-30)")
    try:
        key = coincurve.PublicKey.from_signature_and_message(
            signature[:64] + bytes([recid]), digest, hasher=None
        )
    except (ValueError, TypeError) as exc:
        raise SessionCryptoError("no public key recovers from this signature") from exc
    return address_of(key)


@dataclass(frozen=True, slots=True, repr=False)
class OpenedInit:
    """An ``encrypted_session_init`` opened: its JSON plaintext and the client that signed it."""

    plaintext: bytes
    client_address: str  # recovered over the E2EEv1 digest: the client's static key

    def __repr__(self) -> str:  # the plaintext holds the session key
        return f"OpenedInit(client_address={self.client_address!r})"


def open_session_init(
    host: HostKey,
    ephemeral_public_key: bytes,
    nonce: bytes,
    box: bytes,
    signature: bytes,
    aad: bytes = b"",
) -> OpenedInit:
    """Open an init box sent to ``host`` and recover who signed it (NODE_PROTOCOL.md §1.2, 1.4)."""
    key = init_key(host.shared_x(ephemeral_public_key))
    plaintext = open_box(key, nonce, box, aad)
    digest = e2ee_digest(ephemeral_public_key, host.public_key, nonce, aad=aad)
    return OpenedInit(plaintext, recover_address(digest, signature))


def chunk_aad(index: int) -> bytes:
    return f"chunk_{index}".encode()


def message_aad(index: int) -> bytes:
    return f"message_{index}".encode()
