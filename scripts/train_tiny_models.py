#!/usr/bin/env python3
"""Train tiny llama-architecture models on real text and write them as F16 GGUFs: more (and differently
shaped) models whose full-EWQ decisions FastEWQ can learn from (scripts/train_fastewq.py).

    python scripts/train_tiny_models.py --text ~/.cache/ggufmix-bench/text/calib.txt -o tiny-trained
    for f in tiny-trained/*.gguf; do ggufmix score $f --strategy ewq -o ${f%.gguf}-ewq.json; done

Each model is a byte-level language model (its tokens are the GGUF vocabulary's 256 byte tokens, ids 3..258,
of the vocabulary tests/tinymodel.py writes) with llama's blocks: RMSNorm, attention with RoPE in llama.cpp's
NORM layout (adjacent pairs, so the GGUF needs no permutation), SwiGLU. torch does the training (AdamW, a few
hundred steps); the script prints each model's final loss in bits per byte against 8 for an untrained one.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

BYTE0 = 3  # id of <0x00> in tinymodel's vocabulary


@dataclass(frozen=True)
class Shape:
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int

    @property
    def name(self) -> str:
        return f"tiny-l{self.n_layer}-e{self.n_embd}-f{self.n_ff}-h{self.n_head}-kv{self.n_head_kv}"


SHAPES = (Shape(4, 128, 384, 4, 2), Shape(6, 128, 352, 4, 4), Shape(8, 96, 256, 4, 2), Shape(10, 128, 320, 8, 2),
          Shape(12, 64, 192, 4, 4), Shape(16, 64, 160, 2, 1))


def build_model(shape: Shape, n_vocab: int):  # noqa: ANN201 - torch is imported lazily
    import torch
    from torch import nn

    head_dim = shape.n_embd // shape.n_head

    def rope(x: torch.Tensor) -> torch.Tensor:  # x: (B, H, T, D); llama.cpp NORM: rotate (x[2i], x[2i+1])
        t = x.shape[2]
        inv = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        ang = torch.arange(t, dtype=torch.float32)[:, None] * inv[None, :]
        cos, sin = ang.cos(), ang.sin()
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            e, kv = shape.n_embd, shape.n_head_kv * head_dim
            self.attn_norm, self.ffn_norm = nn.RMSNorm(e, eps=1e-5), nn.RMSNorm(e, eps=1e-5)
            self.attn_q, self.attn_k = nn.Linear(e, e, bias=False), nn.Linear(e, kv, bias=False)
            self.attn_v, self.attn_output = nn.Linear(e, kv, bias=False), nn.Linear(e, e, bias=False)
            self.ffn_gate, self.ffn_up = nn.Linear(e, shape.n_ff, bias=False), nn.Linear(e, shape.n_ff, bias=False)
            self.ffn_down = nn.Linear(shape.n_ff, e, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, _ = x.shape
            h = self.attn_norm(x)
            q = self.attn_q(h).view(b, t, shape.n_head, head_dim).transpose(1, 2)
            k = self.attn_k(h).view(b, t, shape.n_head_kv, head_dim).transpose(1, 2)
            v = self.attn_v(h).view(b, t, shape.n_head_kv, head_dim).transpose(1, 2)
            rep = shape.n_head // shape.n_head_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            a = nn.functional.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
            x = x + self.attn_output(a.transpose(1, 2).reshape(b, t, -1))
            h = self.ffn_norm(x)
            return x + self.ffn_down(nn.functional.silu(self.ffn_gate(h)) * self.ffn_up(h))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.token_embd = nn.Embedding(n_vocab, shape.n_embd)
            self.blocks = nn.ModuleList(Block() for _ in range(shape.n_layer))
            self.output_norm = nn.RMSNorm(shape.n_embd, eps=1e-5)
            self.output = nn.Linear(shape.n_embd, n_vocab, bias=False)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            x = self.token_embd(ids)
            for blk in self.blocks:
                x = blk(x)
            return self.output(self.output_norm(x))

    return Model()


def train(shape: Shape, data: np.ndarray, n_vocab: int, steps: int, seq: int, batch: int, seed: int):  # noqa: ANN201
    import torch

    torch.manual_seed(seed)
    model = build_model(shape, n_vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(seed)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        starts = rng.integers(0, len(data) - seq - 1, batch)
        chunk = torch.from_numpy(np.stack([data[s:s + seq + 1] for s in starts]).astype(np.int64))
        logits = model(chunk[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, n_vocab), chunk[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model, float(loss.detach()) / math.log(2)


def write_gguf(model, shape: Shape, n_vocab: int, path: Path) -> None:  # noqa: ANN001
    import gguf
    from tinymodel import _add_hparams, _add_vocab, _add_weight, _finish

    w = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer = gguf.GGUFWriter(path, "llama")
    _add_hparams(writer, shape.n_layer, shape.n_embd, shape.n_ff, shape.n_head, shape.n_head_kv, 0, 0, 2048, "f16")
    _add_vocab(writer, n_vocab)
    _add_weight(writer, "token_embd.weight", w["token_embd.weight"], "f16")
    _add_weight(writer, "output_norm.weight", w["output_norm.weight"], "f16")
    _add_weight(writer, "output.weight", w["output.weight"], "f16")
    for i in range(shape.n_layer):
        for part in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                     "ffn_down"):
            _add_weight(writer, f"blk.{i}.{part}.weight", w[f"blocks.{i}.{part}.weight"], "f16")
    _finish(writer)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--text", type=Path, required=True, help="training text (bytes)")
    ap.add_argument("-o", "--out", type=Path, required=True, help="folder for the .gguf files")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--n-vocab", type=int, default=384)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = np.frombuffer(args.text.read_bytes(), dtype=np.uint8).astype(np.int64) + BYTE0
    print(f"{'model':<28} {'params':>8} {'bits/byte':>9} {'seconds':>8}")
    for i, shape in enumerate(SHAPES):
        t0 = time.perf_counter()
        model, bpb = train(shape, data, args.n_vocab, args.steps, args.seq, args.batch, seed=i)
        write_gguf(model, shape, args.n_vocab, args.out / f"{shape.name}.gguf")
        n = sum(p.numel() for p in model.parameters())
        print(f"{shape.name:<28} {n:>8} {bpb:>9.3f} {time.perf_counter() - t0:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
