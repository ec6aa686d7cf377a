"""Tiny random llama-architecture GGUF models that llama.cpp loads, for integration tests.

``write_tiny_llama`` writes a model of a few MB with random weights (fixed seed) and a small
SentencePiece-style vocabulary: the 256 byte-fallback tokens, every printable ASCII character, the
word-boundary marker and a few bigrams, so llama.cpp tokenizes any text (unknown characters fall
back to bytes) and adds BOS like a llama model. Dimensions default to multiples of 256 so K-quants
apply to every weight.

Every weight can be read back with ``read_tiny_weights`` for independent numpy computations.
"""
from __future__ import annotations

import itertools
import shutil
import string
from pathlib import Path

import gguf
import numpy as np

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2: llama.cpp's SPM defaults for unk/bos/eos
WORD_MARK = "\u2581"  # SentencePiece's space
_BIGRAMS = ("th", "he", "in", "er", "an", "re", "on", "at", "en", "nd", "ti", "es", "or", "te", "of",
            "ed", "is", "it", "al", "ar", "st", "to", "nt", "ng", "se", "ha", "as", "ou", "io", "le")
_DTYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
           "bf16": gguf.GGMLQuantizationType.BF16}
RMS_EPS = 1e-5


def write_tiny_llama(
    path: str | Path,
    *,
    n_layer: int = 2,
    n_embd: int = 256,
    n_ff: int = 512,
    n_head: int = 4,
    n_head_kv: int = 4,
    n_vocab: int = 384,
    n_expert: int = 0,
    n_expert_used: int = 0,
    n_ctx_train: int = 2048,
    seed: int = 0,
    dtype: str = "f16",
    tied: bool = False,
    zero: frozenset[str] | set[str] = frozenset(),
) -> Path:
    """Write a random llama model that llama.cpp loads and can tokenize plain text with.

    Args:
        path: the .gguf file to write.
        n_layer, n_embd, n_ff, n_head, n_head_kv: the usual llama hyperparameters; n_embd must be a
            multiple of n_head, and n_head of n_head_kv.
        n_vocab: vocabulary size, at least 259 (3 special + 256 byte tokens); characters and bigrams
            fill the rest.
        n_expert, n_expert_used: > 0 makes every FFN a mixture of experts (``ffn_*_exps`` weights,
            evaluated with MUL_MAT_ID), Mixtral-style.
        n_ctx_train: ``llama.context_length``.
        seed: numpy seed for the weights.
        dtype: "f16", "bf16" or "f32" for the 2-D weights; norms are always F32.
        tied: leave out ``output.weight``, so llama.cpp reuses ``token_embd.weight``.
        zero: names of tensors written as all zeros (e.g. a block's output projections: an identity block).

    Returns:
        The path written.

    Raises:
        ValueError: inconsistent hyperparameters.
    """
    _validate(n_embd, n_head, n_head_kv, n_vocab, n_expert, n_expert_used, dtype)
    p = Path(path)
    writer = gguf.GGUFWriter(p, "llama")
    _add_hparams(writer, n_layer, n_embd, n_ff, n_head, n_head_kv, n_expert, n_expert_used, n_ctx_train, dtype)
    _add_vocab(writer, n_vocab)
    shapes = tiny_llama_shapes(n_layer=n_layer, n_embd=n_embd, n_ff=n_ff, n_head=n_head, n_head_kv=n_head_kv,
                               n_vocab=n_vocab, n_expert=n_expert, tied=tied)
    rng = np.random.default_rng(seed)
    for name, shape in shapes.items():
        w = _random_weight(rng, name, shape)
        _add_weight(writer, name, np.zeros_like(w) if name in zero else w, dtype)
    _finish(writer)
    return p


def write_calib_text(folder: Path) -> Path:
    """``folder/calib.txt``: a random text of ten words, about a dozen 512-token chunks for the tiny vocabulary."""
    text = Path(folder) / "calib.txt"
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "north", "green", "seven"]
    text.write_text(" ".join(np.random.default_rng(5).choice(words, 4000)))
    return text


def loud_copy(model: Path, folder: Path) -> Path:
    """``folder/loud.f16.gguf``: ``model`` with every norm's first four channels and ffn_up's first four rows in
    block 1 40x louder: the head's, the blocks' and that ffn_down's inputs have a few loud channels, like a trained
    model's (what ``--smooth`` acts on). The blocks' weights that read a norm's output have those columns 40x quieter,
    as in a trained model (q.k would otherwise saturate the softmax, where F16's rounding changes the logits)."""
    out = Path(folder) / "loud.f16.gguf"
    shutil.copyfile(model, out)
    reader = gguf.GGUFReader(out, "r+")
    readers = ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up")
    for t in reader.tensors:
        data = np.asarray(t.data)
        if t.name.endswith("norm.weight") or t.name == "blk.1.ffn_up.weight":
            data[:4] *= 40
        if t.name.startswith("blk.") and t.name.split(".")[2] in readers:
            data[:, :4] /= 40
    reader.data.flush()
    return out


def tiny_llama_shapes(*, n_layer: int, n_embd: int, n_ff: int, n_head: int, n_head_kv: int, n_vocab: int,
                      n_expert: int = 0, tied: bool = False) -> dict[str, tuple[int, ...]]:
    """Tensor name -> numpy shape (ggml's ne reversed) of a llama model, in file order."""
    head_dim = n_embd // n_head
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (n_vocab, n_embd), "output_norm.weight": (n_embd,)}
    if not tied:
        shapes["output.weight"] = (n_vocab, n_embd)
    for i in range(n_layer):
        b = f"blk.{i}."
        shapes[b + "attn_norm.weight"] = (n_embd,)
        shapes[b + "attn_q.weight"] = (n_head * head_dim, n_embd)
        shapes[b + "attn_k.weight"] = (n_head_kv * head_dim, n_embd)
        shapes[b + "attn_v.weight"] = (n_head_kv * head_dim, n_embd)
        shapes[b + "attn_output.weight"] = (n_embd, n_head * head_dim)
        shapes[b + "ffn_norm.weight"] = (n_embd,)
        if n_expert:
            shapes[b + "ffn_gate_inp.weight"] = (n_expert, n_embd)
            shapes[b + "ffn_gate_exps.weight"] = (n_expert, n_ff, n_embd)
            shapes[b + "ffn_up_exps.weight"] = (n_expert, n_ff, n_embd)
            shapes[b + "ffn_down_exps.weight"] = (n_expert, n_embd, n_ff)
        else:
            shapes[b + "ffn_gate.weight"] = (n_ff, n_embd)
            shapes[b + "ffn_up.weight"] = (n_ff, n_embd)
            shapes[b + "ffn_down.weight"] = (n_embd, n_ff)
    return shapes


def read_tiny_weights(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF written by ``write_tiny_llama`` as float32, numpy-shaped."""
    reader = gguf.GGUFReader(Path(path), "r")
    out = {}
    for t in reader.tensors:
        data = np.asarray(t.data)
        if t.tensor_type == gguf.GGMLQuantizationType.BF16:
            data = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        out[t.name] = data.astype(np.float32).reshape(shape)
    return out


def spm_vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types of a minimal SentencePiece vocabulary of ``n_vocab`` tokens."""
    types = gguf.TokenType
    tokens = list(SPECIAL_TOKENS) + [f"<0x{b:02X}>" for b in range(256)]
    kinds = [types.UNKNOWN, types.CONTROL, types.CONTROL] + [types.BYTE] * 256
    for piece in itertools.islice(_pieces(), n_vocab - len(tokens)):
        tokens.append(piece)
        kinds.append(types.NORMAL)
    # SPM merges the highest-scoring pair first: single characters score highest, then bigrams.
    scores = [0.0 if k != types.NORMAL else -float(i) for i, k in enumerate(kinds)]
    return tokens, scores, [int(k) for k in kinds]


def _pieces():
    """Normal pieces in order: the word mark, printable ASCII, a word-initial form, then bigrams."""
    chars = [WORD_MARK] + [c for c in string.printable if c.isprintable() and c != " "]
    yield from chars
    yield from (WORD_MARK + c for c in string.ascii_lowercase)
    yield from _BIGRAMS
    seen = set(_BIGRAMS)
    for a, b in itertools.product(string.ascii_lowercase, repeat=2):
        if a + b not in seen:
            yield a + b


def _validate(n_embd: int, n_head: int, n_head_kv: int, n_vocab: int, n_expert: int, n_expert_used: int,
              dtype: str) -> None:
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError(f"n_embd {n_embd}, n_head {n_head}, n_head_kv {n_head_kv}: heads must divide evenly")
    if n_vocab < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"n_vocab {n_vocab} < 259: the vocabulary needs the special and 256 byte tokens")
    if n_expert and not 0 < n_expert_used <= n_expert:
        raise ValueError(f"n_expert_used {n_expert_used} must be in 1..{n_expert}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r}: one of {sorted(_DTYPES)}")


def _add_shape(writer: gguf.GGUFWriter, name: str, n_ctx_train: int, n_embd: int, n_layer: int, n_ff: int,
               n_head: int, n_head_kv: int) -> None:
    writer.add_name(name)
    writer.add_context_length(n_ctx_train)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)


def _finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_hparams(writer: gguf.GGUFWriter, n_layer: int, n_embd: int, n_ff: int, n_head: int, n_head_kv: int,
                 n_expert: int, n_expert_used: int, n_ctx_train: int, dtype: str) -> None:
    _add_shape(writer, "tiny-llama", n_ctx_train, n_embd, n_layer, n_ff, n_head, n_head_kv)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16}[dtype])
    if n_expert:
        writer.add_expert_count(n_expert)
        writer.add_expert_used_count(n_expert_used)


def _add_vocab(writer: gguf.GGUFWriter, n_vocab: int) -> None:
    tokens, scores, types = spm_vocab(n_vocab)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


def _random_weight(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if len(shape) == 1:  # norm scales: around 1, but not all 1, so a test notices if they are ignored
        return (1.0 + 0.25 * rng.standard_normal(shape)).astype(np.float32)
    if name == "token_embd.weight":
        return rng.standard_normal(shape).astype(np.float32)
    return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)


def _add_weight(writer: gguf.GGUFWriter, name: str, w: np.ndarray, dtype: str) -> None:
    if w.ndim == 1 or dtype == "f32":
        writer.add_tensor(name, w.astype(np.float32))
    elif dtype == "f16":
        writer.add_tensor(name, w.astype(np.float16))
    else:
        bits = w.astype(np.float32).view(np.uint32)
        bf16 = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        writer.add_tensor(name, bf16, raw_dtype=gguf.GGMLQuantizationType.BF16)


def write_tiny_gemma3(path: str | Path, *, n_layer: int = 6, n_embd: int = 256, n_ff: int = 512, n_head: int = 4,
                      n_head_kv: int = 2, head_dim: int = 64, sliding_window: int = 128, n_vocab: int = 384,
                      n_ctx_train: int = 4096, seed: int = 0, pattern: int | None = None) -> Path:
    """A random Gemma-3-architecture model (tied embedding, q/k norms, post-norms) that llama.cpp loads.

    Its ``gemma3.attention.sliding_window`` makes llama.cpp give it the interleaved sliding-window KV cache
    (5 of every 6 layers local, unless ``pattern`` writes ``gemma3.attention.sliding_window_pattern``).
    """
    p = Path(path)
    writer = gguf.GGUFWriter(p, "gemma3")
    _add_shape(writer, "tiny-gemma3", n_ctx_train, n_embd, n_layer, n_ff, n_head, n_head_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_sliding_window(sliding_window)
    if pattern is not None:
        writer.add_uint32("gemma3.attention.sliding_window_pattern", pattern)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    _add_vocab(writer, n_vocab)
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (n_vocab, n_embd), "output_norm.weight": (n_embd,)}
    for i in range(n_layer):
        b = f"blk.{i}."
        shapes |= {b + "attn_norm.weight": (n_embd,), b + "attn_q.weight": (n_head * head_dim, n_embd),
                   b + "attn_k.weight": (n_head_kv * head_dim, n_embd), b + "attn_v.weight": (n_head_kv * head_dim, n_embd),
                   b + "attn_q_norm.weight": (head_dim,), b + "attn_k_norm.weight": (head_dim,),
                   b + "attn_output.weight": (n_embd, n_head * head_dim), b + "post_attention_norm.weight": (n_embd,),
                   b + "ffn_norm.weight": (n_embd,), b + "ffn_gate.weight": (n_ff, n_embd),
                   b + "ffn_up.weight": (n_ff, n_embd), b + "ffn_down.weight": (n_embd, n_ff),
                   b + "post_ffw_norm.weight": (n_embd,)}
    rng = np.random.default_rng(seed)
    for name, shape in shapes.items():
        _add_weight(writer, name, _random_weight(rng, name, shape), "f16")
    _finish(writer)
    return p


def header_only_copy(path: str | Path, out: str | Path) -> Path:
    """``path`` cut where its tensor data starts: a header-only GGUF, as scripts/header_models.py writes for big models."""
    from ggufmix.io.gguf_index import read_index

    Path(out).write_bytes(Path(path).read_bytes()[:read_index(Path(path)).data_offset])
    return Path(out)
