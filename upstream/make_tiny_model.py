"""Write a tiny random-weight llama GGUF: every request generates exactly ``max_tokens`` tokens.

No PyPI package ships a usable GGUF model and this machine has no internet, so the tests and the
demo run the real, unchanged llama-cpp-python server on a model written here with the ``gguf``
package: about 0.6 MB, written in well under a second, thousands of tokens per second on a CPU.

Why the token counts are exact, whatever the prompt and the sampling settings
------------------------------------------------------------------------------
Metering tests need to know in advance how many tokens a request yields, so the model must never
end a generation early. Zeroing the output rows of the end-of-sequence token only gives it a logit
of 0, which sampling at any temperature (or even greedy decoding, when every other logit happens to
be negative) can still pick. So the model carries a *sentinel* dimension instead:

* every token embedding has the constant ``SENTINEL`` in hidden dimension 0;
* no block writes to dimension 0 (row 0 of ``attn_output`` and ``ffn_down`` is zero), so the
  residual stream keeps exactly that constant through every layer;
* after the final RMS norm dimension 0 is therefore always positive (measured: 3.9 to 4.7);
* the output row of every token that must never be generated (control, byte, and every normal
  token whose text is not a run of lowercase ASCII letters) is ``-BLOCKED_WEIGHT`` there and zero
  elsewhere, so its logit is about -125 to -150, while every generable token has ``+1`` there plus
  random weights elsewhere (logits up to about +30).

Measured over thousands of decoding steps (short and 1500-token contexts): the best generable logit
beats the end-of-sequence logit by at least 150, so even at temperature 2 with top-k, top-p and
min-p all disabled log P(EOS) stays below -76 per step; greedy decoding can never pick it. With the
blocked rows merely zeroed (the first design) the same measurement gives log P(EOS) up to -12.7:
rare, but a flake at test-suite scale.

Why each streamed chunk is exactly one token
--------------------------------------------
llama-cpp-python holds back streamed text that is incomplete UTF-8 or could be the start of a stop
string (the chat template's ``</s>``). Generable tokens are therefore only runs of lowercase ASCII
letters, optionally after the SentencePiece space marker, e.g. ``"▁the"`` -> ``" the"``: never a
byte token, never ``<``, never whitespace alone, never empty.

The tokenizer is a real SentencePiece-style ("llama") vocabulary, so prompts of any text tokenize:
``<unk>``, ``<s>``, ``</s>``, the 256 ``<0xXX>`` byte-fallback tokens, every printable ASCII
character, and a list of words with every prefix of each (llama.cpp's SPM tokenizer only merges two
pieces whose concatenation is itself a token).

What stays the engine's own behaviour (pinned in tests/integration/test_upstream_engine.py):
llama-cpp-python shortens ``max_tokens`` so that prompt + max_tokens < n_ctx; a chat request without
``max_tokens`` generates until the context is full; and a completion with an empty prompt counts
the BOS token it starts from as the first completion token (streamed as an empty-text chunk).

Usage: ``python upstream/make_tiny_model.py OUT.gguf`` or ``write_tiny_model(Path("OUT.gguf"))``.
The output is byte-for-byte deterministic (fixed seed).
"""

from __future__ import annotations

import argparse
import string
import sys
from pathlib import Path

import gguf
import numpy as np

SEED = 20240611
N_EMBD = 64
N_HEAD = 4
N_HEAD_KV = 4
N_LAYER = 2
N_FF = 128
# Big enough for every test prompt plus max_tokens; llama-cpp-python's --n_ctx may be lower.
CONTEXT_LENGTH = 4096
RMS_EPS = 1e-5

# Hidden dimension 0 carries this constant through the whole network (see the module docstring).
SENTINEL = 16.0
BLOCKED_WEIGHT = 32.0
GENERABLE_WEIGHT = 1.0
# Weight scales: blocks write little into the residual stream, so the sentinel keeps dominating it.
EMBD_STD = 0.5
BLOCK_IN_STD = 0.3
BLOCK_OUT_STD = 0.05
OUTPUT_STD = 1.0

SPACE = "\u2581"  # SentencePiece's visible space marker; llama.cpp turns it back into " ".
UNK, BOS, EOS = 0, 1, 2

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

# Plain words give generated text a readable look and give prompts multi-character pieces.
WORDS = """
the of and to in is it you that he was for on are with as his they be at one have this from
or had by hot word but what some we can out other were all there when up use your how said an
each she which do their time if will way about many then them write would like so these her
long make thing see him two has look more day could go come did number sound no most people my
over know water than call first who may down side been now find any new work part take get place
made live where after back little only round man year came show every good me give our under
name very through just form sentence great think say help low line differ turn cause much mean
before move right boy old too same tell does set three want air well also play small end put
home read hand port large spell add even land here must big high such follow act why ask men
change went light kind off need house picture try us again animal point mother world near build
self earth father head stand own page should country found answer school grow study still learn
plant cover food sun four between state keep eye never last let thought city tree cross farm
hard start might story saw far sea draw left late run while press close night real life few
north token meter proof chain block host job claim
""".split()


def _vocabulary() -> tuple[list[str], list[float], list[int], list[bool]]:
    """Return (pieces, scores, token types, generable) in token-id order."""
    pieces: list[str] = ["<unk>", "<s>", "</s>"]
    types: list[int] = [
        int(gguf.TokenType.UNKNOWN),
        int(gguf.TokenType.CONTROL),
        int(gguf.TokenType.CONTROL),
    ]
    for byte in range(256):
        pieces.append(f"<0x{byte:02X}>")
        types.append(int(gguf.TokenType.BYTE))

    normal: list[str] = [SPACE]
    normal += [c for c in string.printable if c.isprintable() and c != " "]
    for word in WORDS:
        for form in (SPACE + word, word):
            normal += [form[:end] for end in range(2, len(form) + 1)]
    seen: set[str] = set(pieces)
    for piece in normal:
        if piece not in seen:
            seen.add(piece)
            pieces.append(piece)
            types.append(int(gguf.TokenType.NORMAL))

    # SPM merges prefer the higher score: favour longer pieces so words come out whole.
    scores = [0.0] * len(pieces)
    generable = [False] * len(pieces)
    for token_id, piece in enumerate(pieces):
        if types[token_id] != int(gguf.TokenType.NORMAL):
            continue
        scores[token_id] = float(len(piece)) - token_id * 1e-6
        letters = piece.removeprefix(SPACE)
        generable[token_id] = bool(letters) and all(c in string.ascii_lowercase for c in letters)
    return pieces, scores, types, generable


def _weights(n_vocab: int, generable: list[bool]) -> dict[str, np.ndarray]:
    """Random weights with the sentinel dimension wired in. numpy shapes are ggml's reversed."""
    rng = np.random.default_rng(SEED)

    def normal(*shape: int, std: float) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    tensors: dict[str, np.ndarray] = {}
    embd = normal(n_vocab, N_EMBD, std=EMBD_STD)
    embd[:, 0] = SENTINEL
    tensors["token_embd.weight"] = embd

    head_dim = N_EMBD // N_HEAD
    for layer in range(N_LAYER):
        prefix = f"blk.{layer}."
        tensors[prefix + "attn_norm.weight"] = np.ones(N_EMBD, dtype=np.float32)
        tensors[prefix + "attn_q.weight"] = normal(N_EMBD, N_EMBD, std=BLOCK_IN_STD)
        tensors[prefix + "attn_k.weight"] = normal(N_HEAD_KV * head_dim, N_EMBD, std=BLOCK_IN_STD)
        tensors[prefix + "attn_v.weight"] = normal(N_HEAD_KV * head_dim, N_EMBD, std=BLOCK_IN_STD)
        attn_out = normal(N_EMBD, N_EMBD, std=BLOCK_OUT_STD)
        attn_out[0, :] = 0.0  # never write to the sentinel dimension
        tensors[prefix + "attn_output.weight"] = attn_out
        tensors[prefix + "ffn_norm.weight"] = np.ones(N_EMBD, dtype=np.float32)
        tensors[prefix + "ffn_gate.weight"] = normal(N_FF, N_EMBD, std=BLOCK_IN_STD)
        tensors[prefix + "ffn_up.weight"] = normal(N_FF, N_EMBD, std=BLOCK_IN_STD)
        ffn_down = normal(N_EMBD, N_FF, std=BLOCK_OUT_STD)
        ffn_down[0, :] = 0.0  # never write to the sentinel dimension
        tensors[prefix + "ffn_down.weight"] = ffn_down

    tensors["output_norm.weight"] = np.ones(N_EMBD, dtype=np.float32)
    output = normal(n_vocab, N_EMBD, std=OUTPUT_STD)
    mask = np.asarray(generable, dtype=bool)
    output[mask, 0] = GENERABLE_WEIGHT
    # A blocked token's logit is -BLOCKED_WEIGHT times the (always positive) sentinel activation.
    output[~mask, :] = 0.0
    output[~mask, 0] = -BLOCKED_WEIGHT
    tensors["output.weight"] = output
    return tensors


def write_tiny_model(path: Path) -> Path:
    """Write the tiny model to ``path`` (parents created) and return ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pieces, scores, types, generable = _vocabulary()

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("sidecar-tiny-test-model")
    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(EOS)
    writer.add_unk_token_id(UNK)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    for name, array in _weights(len(pieces), generable).items():
        # Matrices in F16 halve the file (~0.6 MB); norms stay F32 as llama.cpp expects.
        writer.add_tensor(name, array.astype(np.float16) if array.ndim == 2 else array)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("out", type=Path, help="path of the .gguf file to write")
    args = parser.parse_args(argv)
    path = write_tiny_model(args.out)
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
