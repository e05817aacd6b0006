"""The node's encrypted session messages (NODE_PROTOCOL.md §1), parsed and built: no I/O.

``encrypted_session_init`` carries the session key in a box to the host key; every later
``encrypted_message`` and every reply (``encrypted_chunk``, ``encrypted_response``) is a box under
that session key. Failures are :class:`~sidecar.errors.BadRequest` with the node's own codes
(``MISSING_PAYLOAD``, ``INVALID_PAYLOAD``, ``INVALID_HEX_ENCODING``, ``INVALID_NONCE_SIZE``,
``DECRYPTION_FAILED``...), so the socket answers as the node does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sidecar import crypto
from sidecar.crypto import HostKey, SessionCryptoError
from sidecar.errors import BadRequest
from sidecar.metering import safejson

# The defaults the node applies to an encrypted prompt's missing fields (§1.5).
DEFAULT_MAX_TOKENS = 4000
DEFAULT_TEMPERATURE = 0.7


def _hex_field(payload: dict[str, Any], name: str) -> bytes:
    value = payload[name]
    text = value[2:] if value[:2] in ("0x", "0X") else value
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise BadRequest(f"{name} is not valid hex", code="INVALID_HEX_ENCODING") from None


def _payload(message: dict[str, Any], fields: tuple[str, ...], missing_code: str) -> dict[str, Any]:
    payload = message.get("payload")
    if type(payload) is not dict:
        raise BadRequest("the message has no payload object", code="MISSING_PAYLOAD")
    absent = [f for f in fields if type(payload.get(f)) is not str]
    if absent:
        raise BadRequest(f"the payload lacks {', '.join(absent)}", code=missing_code)
    return payload


def _nonce(payload: dict[str, Any]) -> bytes:
    nonce = _hex_field(payload, "nonceHex")
    if len(nonce) != crypto.NONCE_BYTES:
        raise BadRequest(
            f"the nonce is {len(nonce)} bytes; XChaCha20-Poly1305 takes 24",
            code="INVALID_NONCE_SIZE",
        )
    return nonce


@dataclass(frozen=True, slots=True, repr=False)
class SessionInit:
    """What an ``encrypted_session_init`` said: the new session key, and who signed it."""

    session_key: bytes
    job_id: str | None  # as the client wrote it (a decimal string)
    model: str | None
    client_address: str

    def __repr__(self) -> str:  # never the session key
        return f"SessionInit(job_id={self.job_id!r}, client_address={self.client_address!r})"


def open_init(host: HostKey, message: dict[str, Any]) -> SessionInit:
    """Open an ``encrypted_session_init`` addressed to ``host``."""
    fields = ("ephPubHex", "ciphertextHex", "signatureHex", "nonceHex", "aadHex")
    payload = _payload(message, fields, "INVALID_PAYLOAD")
    eph, box, signature, aad = (
        _hex_field(payload, name)
        for name in ("ephPubHex", "ciphertextHex", "signatureHex", "aadHex")
    )
    nonce = _nonce(payload)
    try:
        opened = crypto.open_session_init(host, eph, nonce, box, signature, aad)
        init = safejson.loads(opened.plaintext)
    except (SessionCryptoError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadRequest(
            f"Failed to decrypt session init payload: {_why(exc)}", code="DECRYPTION_FAILED"
        ) from None
    if type(init) is not dict:
        raise BadRequest(
            "Failed to decrypt session init payload: not a JSON object", code="DECRYPTION_FAILED"
        )
    raw_key = init.get("sessionKey")
    key = _session_key(raw_key)
    job_id, model = init.get("jobId"), init.get("modelName")
    return SessionInit(
        session_key=key,
        job_id=job_id if type(job_id) is str else None,
        model=model if type(model) is str else None,
        client_address=opened.client_address,
    )


def _session_key(raw: object) -> bytes:
    if type(raw) is str:
        text = raw[2:] if raw[:2] in ("0x", "0X") else raw
        try:
            key = bytes.fromhex(text)
        except ValueError:
            key = b""
        if len(key) == crypto.KEY_BYTES:
            return key
    raise BadRequest(
        "Failed to decrypt session init payload: sessionKey is not 32 bytes of hex",
        code="DECRYPTION_FAILED",
    )


def _why(exc: BaseException) -> str:
    if isinstance(exc, SessionCryptoError):
        return str(exc)  # says which check failed, never a key or a plaintext
    return "the plaintext is not UTF-8 JSON"


def open_message(session_key: bytes, message: dict[str, Any]) -> dict[str, Any]:
    """The prompt inside an ``encrypted_message`` (its AAD used as sent; plain text that is not
    JSON is a prompt, as the node reads it), with the node's defaults filled in."""
    payload = _payload(message, ("ciphertextHex", "nonceHex"), "MISSING_PAYLOAD_FIELDS")
    box = _hex_field(payload, "ciphertextHex")
    aad = _hex_field(payload, "aadHex") if type(payload.get("aadHex")) is str else b""
    nonce = _nonce(payload)
    try:
        plaintext = crypto.open_box(session_key, nonce, box, aad)
    except SessionCryptoError as exc:
        raise BadRequest(f"Failed to decrypt message: {exc}", code="DECRYPTION_FAILED") from None
    try:
        text = plaintext.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the decrypted message is not UTF-8", code="INVALID_UTF8") from None
    try:
        request = safejson.loads(text)
    except (ValueError, RecursionError):
        request = None
    if type(request) is not dict:
        request = {"prompt": text}
    request.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
    request.setdefault("temperature", DEFAULT_TEMPERATURE)
    request.setdefault("stream", True)
    return request


class ReplySealer:
    """Seals one response's replies: chunks ``chunk_0``, ``chunk_1``... (each with a fresh
    nonce), then the final ``encrypted_response``."""

    __slots__ = ("_index", "_key")

    def __init__(self, session_key: bytes) -> None:
        self._key = session_key
        self._index = 0

    def chunk(self, text: str, *, tokens: int, final: bool = False) -> dict[str, Any]:
        index = self._index
        self._index += 1
        payload = self._box(text, crypto.chunk_aad(index))
        payload["index"] = index
        message: dict[str, Any] = {"type": "encrypted_chunk", "tokens": tokens, "payload": payload}
        if final:
            message["final"] = True
        return message

    def response(self, finish_reason: str) -> dict[str, Any]:
        payload = self._box(finish_reason, crypto.FINAL_RESPONSE_AAD)
        return {"type": "encrypted_response", "payload": payload}

    def _box(self, text: str, aad: bytes) -> dict[str, Any]:
        # An engine's JSON may hold a lone surrogate ("\ud800"), which UTF-8 cannot carry.
        nonce, box = crypto.seal(self._key, text.encode("utf-8", "replace"), aad)
        return {
            "ciphertextHex": box.hex(),
            "nonceHex": nonce.hex(),
            "aadHex": aad.hex(),
        }
