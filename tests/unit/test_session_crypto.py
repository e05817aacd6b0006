"""The session cipher against the test vectors of ../shared/vectors/e2ee.json (copied to
tests/fixtures/vectors/): derived with the SDK's own libraries and re-derived with three others.
Then what an attacker may send: a tampered box, another host's init, short nonces, bad keys."""

from __future__ import annotations

import json
from pathlib import Path

import coincurve
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar import crypto
from sidecar.crypto import DecryptionFailed, HostKey, SessionCryptoError

V = json.loads((Path(__file__).parents[1] / "fixtures" / "vectors" / "e2ee.json").read_text())


def b(name: str) -> bytes:
    return bytes.fromhex(V[name])


HOST = HostKey(b("hostPriv"))
SESSION_KEY = bytes.fromhex("44" * 32)


def test_keys_and_addresses() -> None:
    assert HOST.public_key.hex() == V["hostPubCompressed"]
    assert HOST.address == V["hostAddress"]
    client = HostKey(b("clientPriv"))
    assert client.public_key.hex() == V["clientPubCompressed"]
    assert client.address == V["clientAddress"]
    assert HostKey(b("ephPriv")).public_key.hex() == V["ephPubCompressed"]


def test_ecdh_x_and_hkdf() -> None:
    shared = HOST.shared_x(b("ephPubCompressed"))
    assert shared.hex() == V["ecdhSharedX"]
    # Both sides agree: the ephemeral key with the host's public key gives the same X.
    assert HostKey(b("ephPriv")).shared_x(HOST.public_key) == shared
    # A 65-byte (uncompressed) public key is accepted too.
    uncompressed = coincurve.PublicKey(b("ephPubCompressed")).format(compressed=False)
    assert HOST.shared_x(uncompressed) == shared
    assert crypto.init_key(shared).hex() == V["initKey"]


def test_init_box_opens_and_names_the_client() -> None:
    opened = crypto.open_session_init(
        HOST, b("ephPubCompressed"), b("initNonceHex"), b("initCiphertextHex"), b("signatureHex")
    )
    assert opened.plaintext.decode() == V["initPlaintext"]
    assert opened.client_address == V["e2eev1RecoveredAddress"] == V["clientAddress"]
    assert "4444" not in repr(opened)  # the session key never shows in a repr


def test_init_box_is_sealed_as_the_sdk_seals_it() -> None:
    key = crypto.init_key(HOST.shared_x(b("ephPubCompressed")))
    nonce, box = crypto.seal(key, V["initPlaintext"].encode(), b"", nonce=b("initNonceHex"))
    assert box.hex() == V["initCiphertextHex"] and nonce == b("initNonceHex")


def test_signed_digest_and_both_recoveries() -> None:
    digest = crypto.e2ee_digest(b("ephPubCompressed"), HOST.public_key, b("initNonceHex"))
    preimage = b"|".join(
        [b"E2EEv1", b("ephPubCompressed"), HOST.public_key, bytes(32), b("initNonceHex"), b""]
    )
    assert preimage.hex() == V["sigMessagePreimageHex"]
    assert digest.hex() == V["sigMessageSha256"]
    assert crypto.recover_address(digest, b("signatureHex")) == V["e2eev1RecoveredAddress"]
    # The real node recovers over sha256(ciphertext): an unrelated address (NODE_PROTOCOL §1.4.7).
    node_digest = b("sha256OfCiphertext")
    assert crypto.recover_address(node_digest, b("signatureHex")) == V["nodeStyleRecoveredAddress"]
    # v as 27/28 means the same.
    sig = b("signatureHex")
    assert crypto.recover_address(digest, sig[:64] + bytes([sig[64] + 27])) == V["clientAddress"]
    # The client's signature, made here the SDK's way, is byte for byte the vector's.
    compact, recid = HostKey(b("clientPriv")).sign_digest(digest)
    assert compact + bytes([recid]) == sig and recid == V["recid"]


def test_message_and_replies() -> None:
    plaintext = crypto.open_box(
        SESSION_KEY, b("msgNonceHex"), b("msgCiphertextHex"), crypto.message_aad(0)
    )
    assert crypto.message_aad(0).hex() == V["msgAadHex"]
    assert plaintext.decode() == V["msgPlaintext"]
    for index, name in ((0, "chunk0"), (1, "chunk1Final")):
        vector = V[name]
        assert crypto.chunk_aad(index).hex() == vector["aadHex"]
        _, box = crypto.seal(
            SESSION_KEY,
            vector["plaintext"].encode(),
            crypto.chunk_aad(index),
            nonce=bytes.fromhex(vector["nonceHex"]),
        )
        assert box.hex() == vector["ciphertextHex"]
    final = V["finalResponse"]
    assert crypto.FINAL_RESPONSE_AAD.hex() == final["aadHex"]
    _, box = crypto.seal(
        SESSION_KEY, b"stop", crypto.FINAL_RESPONSE_AAD, nonce=bytes.fromhex(final["nonceHex"])
    )
    assert box.hex() == final["ciphertextHex"]


def test_challenge_signature() -> None:
    import hashlib

    digest = hashlib.sha256(b("challengeHex")).digest()
    assert digest.hex() == V["challengeSha256"]
    compact, recid = HOST.sign_digest(digest)
    assert compact.hex() == V["challengeSignatureCompact"] and recid == V["challengeRecid"]
    assert crypto.recover_address(digest, compact + bytes([recid])) == HOST.address


# -- what an attacker can send ---------------------------------------------------------------


def test_a_tampered_box_never_opens() -> None:
    box = bytearray(b("initCiphertextHex"))
    box[10] ^= 1
    with pytest.raises(DecryptionFailed):
        crypto.open_session_init(
            HOST, b("ephPubCompressed"), b("initNonceHex"), bytes(box), b("signatureHex")
        )
    with pytest.raises(DecryptionFailed):  # the right box under the wrong AAD
        crypto.open_box(SESSION_KEY, b("msgNonceHex"), b("msgCiphertextHex"), b"message_1")


def test_an_init_for_another_host_does_not_open() -> None:
    other = HostKey(bytes.fromhex("55" * 32))
    with pytest.raises(DecryptionFailed):
        crypto.open_session_init(
            other,
            b("ephPubCompressed"),
            b("initNonceHex"),
            b("initCiphertextHex"),
            b("signatureHex"),
        )


@pytest.mark.parametrize("size", [0, 12, 23, 25])
def test_nonces_of_the_wrong_size_are_refused(size: int) -> None:
    with pytest.raises(SessionCryptoError, match="24 bytes") as caught:
        crypto.open_box(SESSION_KEY, bytes(size), b("msgCiphertextHex"), b"")
    assert not isinstance(caught.value, DecryptionFailed)


def test_bad_keys_and_signatures_are_refused_without_echoing_them() -> None:
    with pytest.raises(SessionCryptoError) as caught:
        HOST.shared_x(bytes.fromhex("02" + "ff" * 32))  # not on the curve
    assert "ff" * 8 not in str(caught.value)
    with pytest.raises(SessionCryptoError):
        HostKey(bytes(32))  # zero is no key
    with pytest.raises(SessionCryptoError):
        crypto.recover_address(bytes(32), bytes(64))
    with pytest.raises(SessionCryptoError):
        crypto.recover_address(bytes(32), b("signatureHex")[:64] + b"\x09")
    assert "1111" not in repr(HOST)


@given(st.binary(max_size=2000), st.binary(max_size=64))
def test_seal_then_open_is_the_identity(plaintext: bytes, aad: bytes) -> None:
    nonce, box = crypto.seal(SESSION_KEY, plaintext, aad)
    assert len(nonce) == 24 and len(box) == len(plaintext) + 16
    assert crypto.open_box(SESSION_KEY, nonce, box, aad) == plaintext


@given(st.binary(min_size=1, max_size=200), st.integers(min_value=0))
def test_any_single_bit_flip_is_refused(plaintext: bytes, position: int) -> None:
    nonce, box = crypto.seal(SESSION_KEY, plaintext, b"chunk_0")
    flipped = bytearray(box)
    flipped[position % len(box)] ^= 1 << (position % 8)
    with pytest.raises(DecryptionFailed):
        crypto.open_box(SESSION_KEY, nonce, bytes(flipped), b"chunk_0")


def test_a_host_without_a_key_never_loads_the_cipher() -> None:
    import subprocess
    import sys

    code = (
        "import sys, sidecar.app; "
        "print([m for m in ('coincurve', 'nacl', 'cryptography') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
