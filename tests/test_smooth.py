"""--smooth: the head's and the FFNs' inputs scaled for the CPU backend's input rounding (realize/smooth.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from tinymodel import loud_copy, write_calib_text

from ggufmix.cli import cli
from ggufmix.realize.smooth import (ChannelScales, SmoothGroup, Smoothing, channel_scales, choose, gain, group_errors,
                                    output_error)
from ggufmix.types import QuantType


def _round_input(x: np.ndarray, qtype: QuantType) -> np.ndarray:
    from ggufmix.engine import kernels

    return kernels.reference_roundtrip(x, qtype)


def _round_weights(w: np.ndarray, qtype: QuantType, col: np.ndarray | None) -> np.ndarray:
    from ggufmix.engine.oracle import quant_roundtrip

    return quant_roundtrip(w, qtype, None if col is None else col[None, :])


def _loud_inputs(rng: np.random.Generator, tokens: int = 256, cols: int = 512) -> np.ndarray:
    """Inputs with four channels 40x the others, the shape of a final norm's output."""
    x = rng.standard_normal((tokens, cols)).astype(np.float32)
    x[:, :4] *= 40
    return x


def test_scales_shrink_only_the_loud_channels() -> None:
    rms = np.array([1.0, 1.0, 1.0, 4.0, 16.0])
    assert np.array_equal(channel_scales(rms, 0.0), np.ones(5))
    assert np.allclose(channel_scales(rms, 0.5), [1, 1, 1, 2, 4])


def test_loud_channels_choose_a_scale_that_lowers_the_output_error() -> None:
    """Q6_K's input is rounded in blocks of 256 (Q8_K): the loud channels set the step of their block. Scaling them
    down lowers the head's output error; alpha 0 is always a candidate, so the choice never raises it."""
    rng = np.random.default_rng(0)
    x, w = _loud_inputs(rng), rng.standard_normal((64, 512)).astype(np.float32)
    found = choose(x, w, QuantType.Q6_K, None, _round_input, _round_weights)
    assert found.alpha > 0 and found.errors[found.alpha] < 0.8 * found.errors[0.0], found.errors
    assert found.scales[:4].min() > 1 and np.all(found.scales[4:] < 1.2)
    same = output_error(x, w, np.ones(512, np.float32), QuantType.Q6_K, None, _round_input, _round_weights)
    assert same == pytest.approx(found.errors[0.0])


def test_held_out_rows_judge_scales_made_on_others() -> None:
    """A block weight's kind is judged on rows its scales did not see: channels loud only where the scales were made
    are shrunk for nothing on the others, and the gain there is gone."""
    rng = np.random.default_rng(1)
    fit, w = _loud_inputs(rng), rng.standard_normal((64, 512)).astype(np.float32)
    moved = rng.standard_normal((256, 512)).astype(np.float32)
    moved[:, 4:8] *= 40  # other channels loud on the held-out rows
    members = [(w, QuantType.Q6_K, None)]
    same = group_errors(fit, members, _round_input, _round_weights, (0.0, 0.25))
    held_out = group_errors(moved, members, _round_input, _round_weights, (0.0, 0.25), fit=fit)
    assert gain(same, 0.25) > 0.1 and gain(held_out, 0.25) <= 0.0, (same, held_out)


def _scaled_everywhere() -> Smoothing:
    """The head's input, block 1's ffn_down's, attention's and FFN's inputs scaled (ffn_up: its columns for its input,
    its rows for ffn_down's), and block 0's attention input (tiny_model: 256 channels, 512 FFN channels)."""
    def chosen(n: int) -> ChannelScales:
        return ChannelScales(0.5, channel_scales(np.r_[np.full(4, 40.0), np.ones(n - 4)], 0.5), {}, 0)
    groups = {"output.weight": SmoothGroup("head", ("output.weight",), ("output_norm.weight",)),
              "blk.1.ffn_down.weight": SmoothGroup("ffn_down", ("blk.1.ffn_down.weight",), ("blk.1.ffn_up.weight",)),
              "blk.1.ffn_gate.weight": SmoothGroup("ffn_in", ("blk.1.ffn_gate.weight", "blk.1.ffn_up.weight"),
                                                   ("blk.1.ffn_norm.weight",))}
    for b in (0, 1):
        groups[f"blk.{b}.attn_q.weight"] = SmoothGroup("attn_in", tuple(f"blk.{b}.attn_{r}.weight" for r in "qkv"),
                                                       (f"blk.{b}.attn_norm.weight",))
    return Smoothing({k: chosen(512 if g.kind == "ffn_down" else 256) for k, g in groups.items()}, groups)


def test_the_smoothed_copy_computes_the_same_logits(tiny_model: Path, tmp_path: Path) -> None:
    from ggufmix.evaluate.evaluation import evaluate
    from ggufmix.realize.smooth import write_smoothed

    model = loud_copy(tiny_model, tmp_path)
    copy = tmp_path / "smoothed.gguf"
    write_smoothed(model, copy, _scaled_everywhere())
    rep = evaluate(model, [copy], write_calib_text(tmp_path).read_text(), ctx=64, chunks=4, cache=False, n_threads=2,
                   progress=False)
    assert abs(rep.quants[0].divergence.kld.value) < 1e-5  # the same function, up to F16 rounding of the weights


def _changed_by(settings: dict) -> set[str]:
    """The tensors a plan's smoothing changes: each scaled weight and the tensor that makes its input."""
    out = {"output_norm.weight", "output.weight"} if (settings["head"] or {}).get("alpha") else set()
    for name, alpha in settings["ffn_down_alpha"].items():
        out |= {name, name.replace("ffn_down", "ffn_up")} if alpha else set()
    for name, alpha in settings["block_input_alpha"].items():
        blk, role = name.rsplit(".", 2)[0], name.split(".")[2]
        roles = ("attn_q", "attn_k", "attn_v", "attn_norm") if role == "attn_q" else ("ffn_gate", "ffn_up", "ffn_norm")
        out |= {f"{blk}.{r}.weight" for r in roles} if alpha else set()
    return out


def test_build_smooth(tiny_model: Path, tmp_path: Path) -> None:
    """`build --calib` (--smooth and --smooth-ffn are on with --calib) smooths a head, the blocks' inputs and ffn_down
    whose inputs have loud channels: each alpha is recorded (the head's with its output error at each alpha), exactly
    the scaled weights and their partners change (against --no-smooth), no copy is left behind; with --no-smooth-ffn
    ffn_down is left alone. Block weights take one alpha in every block."""
    from gguf import GGUFReader

    model, calib = loud_copy(tiny_model, tmp_path), write_calib_text(tmp_path)
    common = ["-q", "build", str(model), "--rows", "32", "--no-smoke", "--budget", "5.5bpw", "--calib", str(calib)]
    plain, smooth, head_only = tmp_path / "plain.gguf", tmp_path / "smooth.gguf", tmp_path / "head.gguf"
    for args in ([*common, "--no-smooth", "-o", str(plain)], [*common, "-o", str(smooth)],
                 [*common, "--no-smooth-ffn", "-o", str(head_only)]):
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 0, res.output
    settings = json.loads(smooth.with_suffix(".plan.json").read_text())["settings"]["smooth"]
    head = settings["head"]
    errors = {float(a): e for a, e in head["relative_error"].items()}
    assert head["alpha"] > 0 and errors[head["alpha"]] < errors[0.0], settings
    assert set(settings["ffn_down_alpha"].values()) == {0.25}, settings  # every block's or none
    ra, rb = ({t.name: np.asarray(t.data) for t in GGUFReader(p).tensors} for p in (plain, smooth))
    assert {n for n in ra if not np.array_equal(ra[n], rb[n])} == _changed_by(settings)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert all(a > 0 for a in settings["block_input_alpha"].values()) and len(settings["block_input_alpha"]) == 2 * 4
    default = json.loads(head_only.with_suffix(".plan.json").read_text())["settings"]["smooth"]
    assert default["ffn_down_alpha"] == {} and "blk.1.ffn_up.weight" in _changed_by(default)
    assert "blk.1.ffn_down.weight" not in _changed_by(default)


def test_a_tied_head_is_left_alone(odd_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "tied.gguf"
    res = CliRunner().invoke(cli, ["-q", "build", str(odd_model), "--rows", "32", "--no-smoke", "--budget", "5.5bpw",
                                   "--calib", str(write_calib_text(tmp_path)), "--smooth", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(out.with_suffix(".plan.json").read_text())["settings"]["smooth"]["head"] is None


def test_smooth_needs_calibration_text(tiny_model: Path, tmp_path: Path) -> None:
    for flag in ("--smooth", "--smooth-head", "--smooth-ffn"):  # --smooth-head: --smooth's name before 2026-12-06
        res = CliRunner().invoke(cli, ["build", str(tiny_model), "--budget", "4.5bpw", flag,
                                       "-o", str(tmp_path / "x.gguf")])
        assert res.exit_code != 0 and "--calib" in res.output


def test_the_patched_file_holds_the_bytes_llama_cpp_writes_from_the_smoothed_copy(tiny_model: Path,
                                                                                  tmp_path: Path) -> None:
    """Without --gptq the file is smoothed after quantizing (no copy of the source): every tensor's bytes equal
    those llama.cpp writes from the smoothed copy with the scaled imatrix, head and FFN alike."""
    from functools import partial

    from gguf import GGUFReader

    from ggufmix.engine.activations import collect_imatrix
    from ggufmix.io.gguf_source import open_gguf
    from ggufmix.plan.budget import parse_budget
    from ggufmix.plan.planner import make_plan
    from ggufmix.realize.build import quantize_plan
    from ggufmix.realize.smooth import (
        SmoothOptions,
        choose_smoothing,
        patch_quantized,
        scaled_imatrix,
        write_smoothed,
    )
    from ggufmix.score.measure import ScoreOptions, open_source, score_source

    model, calib = loud_copy(tiny_model, tmp_path), write_calib_text(tmp_path)
    im = collect_imatrix(model, calib.read_text(), n_ctx=64, n_chunks=4, include_output=True, progress=False)
    src = open_gguf(model)
    plan = make_plan(score_source(open_source(model, False), ScoreOptions(max_rows=32), im, progress=False),
                     parse_budget("4.5bpw"))
    found = choose_smoothing(src, plan, im, SmoothOptions(calib.read_text(), ctx=64, ffn=True))
    assert found is not None and "output.weight" in im
    assert found.chosen["output.weight"].alpha > 0 and found.chosen["blk.1.ffn_down.weight"].alpha > 0
    patched, copied, copy = tmp_path / "patched.gguf", tmp_path / "copied.gguf", tmp_path / "copy.f16.gguf"
    quantize_plan(model, patched, plan, im, patch=partial(patch_quantized, src=src, smoothing=found, imatrix=im))
    write_smoothed(model, copy, found)
    quantize_plan(copy, copied, plan, scaled_imatrix(im, found))
    a, b = ({t.name: np.asarray(t.data).tobytes() for t in GGUFReader(p).tensors} for p in (patched, copied))
    assert a.keys() == b.keys() and [n for n in a if a[n] != b[n]] == []


def test_a_type_gguf_py_does_not_know_is_patched_too(tiny_model: Path, tmp_path: Path) -> None:
    """A plan with Q2_0 (ggml type 42, unknown to gguf 0.19): the smoothed file is patched in place as with any
    type (the bench crashed here on SmolLM2-135M's oracle plan at Q4_K_M's size, 2026-12-06)."""
    from dataclasses import replace
    from functools import partial

    from ggufmix.engine.activations import collect_imatrix
    from ggufmix.io.gguf_source import open_gguf, writable_tensors
    from ggufmix.plan.budget import parse_budget
    from ggufmix.plan.planner import make_plan
    from ggufmix.realize.build import quantize_plan
    from ggufmix.realize.smooth import SmoothOptions, choose_smoothing, patch_quantized
    from ggufmix.score.measure import ScoreOptions, open_source, score_source
    from ggufmix.types import row_bytes

    model, calib = loud_copy(tiny_model, tmp_path), write_calib_text(tmp_path)
    im = collect_imatrix(model, calib.read_text(), n_ctx=64, n_chunks=4, include_output=True, progress=False)
    src = open_gguf(model)
    plan = make_plan(score_source(open_source(model, False), ScoreOptions(max_rows=32), im, progress=False),
                     parse_budget("4.5bpw"))
    q2 = "blk.0.attn_k.weight"  # a reader of a smoothed input when the attention inputs are smoothed
    plan = replace(plan, entries=tuple(
        replace(e, qtype=QuantType.Q2_0, bytes=row_bytes(QuantType.Q2_0, e.shape[0]) * (e.shape[1]))
        if e.name == q2 else e for e in plan.entries))
    found = choose_smoothing(src, plan, im, SmoothOptions(calib.read_text(), ctx=64, ffn=True))
    assert found is not None and found.active
    plain, patched = tmp_path / "plain.gguf", tmp_path / "patched.gguf"
    quantize_plan(model, plain, plan, im)
    quantize_plan(model, patched, plan, im, patch=partial(patch_quantized, src=src, smoothing=found, imatrix=im))
    with writable_tensors(plain) as a, writable_tensors(patched) as b:
        assert a[q2][0].qtype == b[q2][0].qtype == QuantType.Q2_0
        changed = {n for n in a if a[n][1].tobytes() != b[n][1].tobytes()}
    assert "output.weight" in changed and changed <= {n for n in a if found.scaling(n)}
