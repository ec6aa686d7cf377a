"""The whole build on tiny models that llama.cpp loads: plan, overrides, verification, artifacts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ggufmix.engine.quantize import quantize_file
from ggufmix.errors import BudgetError, UsageError, VerifyError
from ggufmix.io.gguf_source import open_gguf
from ggufmix.plan.budget import bpw, parse_budget
from ggufmix.plan.plan import Plan, PlanEntry
from ggufmix.plan.planner import make_plan, parse_pin
from ggufmix.realize.build import build
from ggufmix.realize.overrides import overrides, recipe
from ggufmix.realize.verify import verify
from ggufmix.score.measure import ScoreOptions, open_source, score_source
from ggufmix.types import QuantType, block_size, mix_file_type


@pytest.fixture(scope="module")
def tiny_scores(tiny_model: Path):  # noqa: ANN201
    return score_source(open_source(tiny_model, False), ScoreOptions(max_rows=64), None, progress=False)


def test_build_hits_budget_and_verifies(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    res = build(tiny_model, out, parse_budget("4.5bpw"), opts=ScoreOptions(max_rows=64), progress=False)
    written = open_gguf(out)
    assert written.total_bytes == res.plan.total_bytes
    assert bpw(written.total_bytes, written.total_elements) <= 4.5
    assert {n: t.qtype for n, t in written.tensors.items()} == res.plan.types()
    assert len(set(res.plan.types().values())) > 2  # a real mix, not one type
    assert isinstance(res.smoke, str)
    plan = Plan.load(tmp_path / "out.plan.json")
    assert plan.types() == res.plan.types() and plan.versions["llama-cpp-python"] == "0.3.36"
    lines = (tmp_path / "out.recipe.txt").read_text().split()
    assert len(lines) == len(plan.quantized()) and lines[0].startswith("^") and "=" in lines[0]
    assert json.loads((tmp_path / "out.build.json").read_text())["verified"]["total_bytes"] == written.total_bytes
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("budget", ["3.0bpw", "4.0bpw", "5.0bpw", "6.5bpw"])
def test_plan_lands_within_tolerance(tiny_scores, budget: str) -> None:  # noqa: ANN001
    b = parse_budget(budget)
    plan = make_plan(tiny_scores, b)
    assert 0 <= b.value - plan.bpw <= 0.02


def test_more_budget_never_more_error(tiny_scores) -> None:  # noqa: ANN001
    costs = [sum(e.cost for e in make_plan(tiny_scores, parse_budget(f"{b}bpw")).quantized())
             for b in (3.0, 3.5, 4.0, 5.0, 6.0, 8.0)]
    assert costs == sorted(costs, reverse=True)


def test_plan_is_deterministic(tiny_scores, tmp_path: Path) -> None:  # noqa: ANN001
    pa, pb = make_plan(tiny_scores, parse_budget("4bpw")), make_plan(tiny_scores, parse_budget("4bpw"))
    assert pa.save(tmp_path / "a.json").read_bytes() == pb.save(tmp_path / "b.json").read_bytes()
    assert recipe(pa) == recipe(pb)


def test_size_budget_in_bytes(tiny_scores) -> None:  # noqa: ANN001
    plan = make_plan(tiny_scores, parse_budget("2.5MB"))
    assert plan.total_bytes <= 2_500_000 and plan.budget_bytes == 2_500_000


def test_infeasible_budget_states_range(tiny_scores) -> None:  # noqa: ANN001
    with pytest.raises(BudgetError, match=r"sizes range from .* MB \(.* bpw\) to .* MB \(8\.5"):
        make_plan(tiny_scores, parse_budget("1.0bpw"))
    with pytest.raises(BudgetError):
        make_plan(tiny_scores, parse_budget("9bpw"))


def test_pins_and_palette(tiny_scores) -> None:  # noqa: ANN001
    plan = make_plan(tiny_scores, parse_budget("5bpw"), pins=[parse_pin(r"output\.weight=Q6_K")],
                     types=(QuantType.Q4_K, QuantType.Q5_K, QuantType.Q6_K, QuantType.Q8_0))
    types = plan.types()
    assert types["output.weight"] == QuantType.Q6_K
    assert {t for e, t in types.items() if plan.entries[0] and e.endswith("weight") and "norm" not in e} <= {
        QuantType.Q4_K, QuantType.Q5_K, QuantType.Q6_K, QuantType.Q8_0}
    with pytest.raises(UsageError, match="matches no quantizable tensor"):
        make_plan(tiny_scores, parse_budget("5bpw"), pins=[parse_pin(r"nothing\.here=Q6_K")])
    with pytest.raises(UsageError, match="bad regex"):
        parse_pin("blk.(=Q4_K")


def test_palette_that_fits_nothing_names_the_tensor(odd_model: Path) -> None:
    scores = score_source(open_source(odd_model, False), ScoreOptions(max_rows=32), None, progress=False)
    with pytest.raises(UsageError, match=r"'token_embd\.weight': rows of 320 fit none of --types Q4_K,Q6_K; it can take Q2_0"):
        make_plan(scores, parse_budget("5bpw"), types=(QuantType.Q4_K, QuantType.Q6_K))


def test_odd_shapes_plan_only_types_that_fit(odd_model: Path, tmp_path: Path) -> None:
    """Rows of 320: the plan uses 32/64-block types there, and llama.cpp writes exactly those."""
    out = tmp_path / "odd.gguf"
    res = build(odd_model, out, parse_budget("4.0bpw"), opts=ScoreOptions(max_rows=32), smoke=False, progress=False)
    blocks = {e.name: block_size(e.qtype) for e in res.plan.quantized()}
    assert all(e.shape[0] % blocks[e.name] == 0 for e in res.plan.quantized())
    assert 256 in blocks.values() and any(b < 256 for b in blocks.values())  # both families in use
    assert res.verified.bpw <= 4.0


def test_overrides_are_anchored_and_escaped(tiny_scores) -> None:  # noqa: ANN001
    plan = make_plan(tiny_scores, parse_budget("4bpw"))
    pats = dict(overrides(plan))
    assert r"^blk\.1\.attn_q\.weight$" in pats
    assert recipe(plan).count("\n") == len(plan.quantized())


def test_verify_catches_a_fallback(odd_model: Path, tmp_path: Path) -> None:
    """llama.cpp silently turns Q4_K into Q5_0 on rows of 320; verification must refuse that file."""
    src = open_gguf(odd_model)
    out = tmp_path / "fb.gguf"
    quantize_file(odd_model, out, ftype=mix_file_type("Q8_0"),
                  overrides=[(r"^blk\.0\.attn_q\.weight$", QuantType.Q4_K)], progress=False)
    written = open_gguf(out)
    entries = tuple(PlanEntry(n, t.shape, QuantType.Q4_K if n == "blk.0.attn_q.weight" else t.qtype, t.n_bytes,
                              "x", None, 0.0 if n == "blk.0.attn_q.weight" else None) for n, t in written.tensors.items())
    plan = Plan(entries, "x", 0, src.total_elements, "measured", {}, {}, "llama")
    with pytest.raises(VerifyError, match=r"'blk\.0\.attn_q\.weight' is Q5_0, planned Q4_K"):
        verify(out, plan)


def test_output_rules(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="overwrite the input"):
        build(tiny_model, tiny_model, parse_budget("4bpw"), progress=False)
    existing = tmp_path / "exists.gguf"
    existing.write_bytes(b"x")
    with pytest.raises(UsageError, match="already exists"):
        build(tiny_model, existing, parse_budget("4bpw"), progress=False)
    with pytest.raises(UsageError, match="does not exist"):
        build(tiny_model, tmp_path / "nope" / "o.gguf", parse_budget("4bpw"), progress=False)
    assert existing.read_bytes() == b"x"


def test_outputs_get_ordinary_permissions(tmp_path: Path) -> None:
    """Temporary files renamed into place carry the umask's permissions, not mkstemp's 0600."""
    import os
    import stat

    from ggufmix.artifacts import write_text_atomic

    mask = os.umask(0o022)
    try:
        p = write_text_atomic(tmp_path / "r.txt", "x")
    finally:
        os.umask(mask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o644
    assert [q.name for q in tmp_path.iterdir()] == ["r.txt"]


@pytest.mark.parametrize("maker, call", [("temp_beside", "fchmod"), ("dir_beside", "mkdir")])
def test_interrupt_while_the_temporary_file_is_made_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    maker: str, call: str) -> None:
    """Ctrl-C arriving as the temporary file (or a bundle's staging folder) is made (here: sent to this process from
    inside the os call that makes or finishes it) is held until it is made and then removes it: a build killed as
    its temporary file appeared left it behind."""
    import os
    import signal

    from ggufmix import artifacts

    real = getattr(os, call)

    def interrupted(*args: object, **kwargs: object) -> object:
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    monkeypatch.setattr(os, call, interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            getattr(artifacts, maker)(tmp_path / "o.gguf")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert list(tmp_path.iterdir()) == []


def test_not_enough_disk_is_refused_before_quantizing(tiny_model: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(UsageError, match="MB free, the output needs"):
        build(tiny_model, tmp_path / "o.gguf", parse_budget("4bpw"), opts=ScoreOptions(max_rows=16), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_build_measures_no_type_far_under_its_budget_but_keeps_pinned_ones(tiny_model: Path, tmp_path: Path) -> None:
    from ggufmix.realize.build import BUDGET_REACH_BPW, budget_width, type_floor
    from ggufmix.score.measure import candidate_types
    from ggufmix.types import bits_per_weight

    src = open_source(tiny_model, False)
    width = budget_width(tiny_model, parse_budget("6.5bpw"))
    opts = type_floor(ScoreOptions(max_rows=64), width, (QuantType.Q2_K,))
    assert opts.min_bpw == pytest.approx(6.5 - BUDGET_REACH_BPW, abs=0.01)
    types, _ = candidate_types(src, opts, None)
    assert QuantType.Q2_K in types and QuantType.Q8_0 in types
    assert all(bits_per_weight(t) >= opts.min_bpw for t in types if t != QuantType.Q2_K)
    assert QuantType.Q3_K not in types
    res = build(tiny_model, tmp_path / "o.gguf", parse_budget("6.5bpw"), opts=ScoreOptions(max_rows=64),
                pins=[parse_pin(r"blk\.0\.ffn_down\.weight=Q2_K")], smoke=False, progress=False)
    assert res.plan.types()["blk.0.ffn_down.weight"] == QuantType.Q2_K
    assert res.plan.settings["min_bpw"] == opts.min_bpw
    # a scorer that does not quantize weights (uniform) keeps every type; so does a build without a budget width
    assert candidate_types(src, type_floor(ScoreOptions(strategy="uniform"), width, ()),
                           None)[0] == candidate_types(src, ScoreOptions(), None)[0]


def test_a_source_llama_cpp_refuses_stops_the_build_with_its_reason(tmp_path: Path) -> None:
    import sys

    from ggufmix.errors import EngineError

    sys.path.insert(0, str(Path(__file__).parent))
    from tinymodel import write_tiny_llama

    src = write_tiny_llama(tmp_path / "bad.f16.gguf", n_layer=2, n_vocab=300, seed=3)
    raw = src.read_bytes()
    key = b"tokenizer.ggml.model"
    at = raw.index(key) + len(key) + 4 + 8  # the value after its type (u32) and length (u64)
    assert raw[at:at + 5] == b"llama"
    src.write_bytes(raw[:at] + b"nomod" + raw[at + 5:])  # a tokenizer llama.cpp does not know; the index parses
    out = tmp_path / "out.gguf"
    # llama.cpp reads the metadata in a child process beside the measuring; its refusal ends the build
    with pytest.raises(EngineError, match="bad.f16.gguf"):
        build(src, out, parse_budget("4.5bpw"), opts=ScoreOptions(max_rows=16), smoke=False, progress=False)
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))
