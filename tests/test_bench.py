from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from tinymodel import loud_copy, write_calib_text

from ggufmix.bench.bench import smoothed_alike
from ggufmix.bench.report import by_strategy, markdown, versus_stock
from ggufmix.cli import cli
from ggufmix.plan.plan import Plan


def _row(kind: str, target: str, kld: float, nbytes: int, imatrix: str = "none") -> dict:
    return {"file": f"{kind}-{target}.gguf", "kind": kind, "imatrix": imatrix, "target": target,
            "tensor_bytes": nbytes, "file_bytes": nbytes + 100, "bpw": nbytes * 8 / 1000, "kld": kld,
            "kld_stderr": 0.001, "kld_p99": 10 * kld, "ppl": 10.0, "ppl_stderr": 0.1, "top1": 0.9, "build_s": 1.0}


def test_versus_stock_pairs_same_target_and_imatrix() -> None:
    rows = [_row("stock", "Q2_K", 0.4, 500), _row("measured", "Q2_K", 0.2, 499), _row("uniform", "Q2_K", 0.5, 498),
            _row("measured", "Q2_K", 0.1, 499, "imatrix"), _row("measured", "4bpw", 0.3, 500)]
    vs = versus_stock(rows)
    assert [(v["strategy"], round(v["ratio"], 3)) for v in vs] == [("measured", 0.5), ("uniform", 1.25)]
    md = markdown({"model": "m.gguf", "base_ppl": 9.0, "config": {"text": "t.txt"}, "rows": rows,
                   "eval": {"n_chunks": 2, "ctx": 64, "kld_mode": "exact", "llama_cpp_python": "0.3.36"}})
    assert "| Q2_K | none | measured | 0.4000 | 0.2000 | 0.500 | 499 / 500 |" in md
    # the pivot: strategies x targets, smallest target first, best per column in bold, missing cells '-'
    targets, table = by_strategy(rows, "none")
    assert targets == ["Q2_K", "4bpw"] and table == {"measured": {"Q2_K": 0.2, "4bpw": 0.3}, "uniform": {"Q2_K": 0.5}}
    assert "| strategy | = Q2_K (stock 0.4000) | 4bpw |" in md
    assert "| `measured` | **0.2000** | **0.3000** |" in md and "| `uniform` | 0.5000 | - |" in md
    assert md.index("| `measured` |") < md.index("| `uniform` |")


def test_bench_end_to_end(tiny_model: Path, tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog, again and again. " * 60)
    out = tmp_path / "bench" / "tiny"  # neither folder exists yet: bench makes them, as the README's -o bench/... needs
    args = ["-q", "bench", str(tiny_model), "--text", str(text), "--calib", str(text), "--baselines", "Q4_K_M",
            "--budgets", "5", "--imatrix-chunks", "2", "--ctx", "64", "--chunks", "2", "-o", str(out)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert len(rows) == 2 * (1 + 2 * 2)  # (none, imatrix) x (stock + 2 strategies x (5bpw, Q4_K_M size))
    for mode in ("none", "imatrix"):
        stock = next(r for r in rows if r["kind"] == "stock" and r["imatrix"] == mode)
        ours = [r for r in rows if r["kind"] != "stock" and r["imatrix"] == mode and r["target"] == "Q4_K_M"]
        assert len(ours) == 2 and all(r["tensor_bytes"] <= stock["tensor_bytes"] for r in ours)
    assert all(r["kld"] > 0 and r["build_s"] is not None for r in rows if r["kind"] != "stock")
    assert "At each stock mix's size" in (out / "results.md").read_text()
    assert (out / "pareto.png").stat().st_size > 1000
    assert (out / "ggufmix-measured-imatrix-5bpw.layers.png").exists()
    res = CliRunner().invoke(cli, args)  # a second run reuses every file
    assert res.exit_code == 0, res.output
    again = json.loads((out / "results.json").read_text())["rows"]
    assert all(r["build_s"] is None for r in again)
    assert [r["kld"] for r in again] == [r["kld"] for r in rows]
    # a kept file that the current planner would plan otherwise is built again, and only that one
    stale = out / "ggufmix-uniform-none-5bpw.recipe.txt"
    stale.write_text(stale.read_text().replace("=q", "=q8_0 #", 1))
    assert CliRunner().invoke(cli, args).exit_code == 0
    rebuilt = json.loads((out / "results.json").read_text())["rows"]
    assert [r["file"] for r in rebuilt if r["build_s"] is not None] == ["ggufmix-uniform-none-5bpw.gguf"]
    assert "#" not in stale.read_text()  # the rebuild wrote the current recipe
    # the second run took every file's numbers from its .eval.json; a stale one is measured again
    kept = out / "stock-Q4_K_M-none.eval.json"
    doc = json.loads(kept.read_text())
    assert doc["row"]["kld"] == rows[0]["kld"]
    doc["row"]["kld"] = 123.0
    kept.write_text(json.dumps(doc))
    assert CliRunner().invoke(cli, args).exit_code == 0
    assert json.loads((out / "results.json").read_text())["rows"][0]["kld"] == 123.0
    doc["key"]["ctx"] = 32
    kept.write_text(json.dumps(doc))
    assert CliRunner().invoke(cli, args).exit_code == 0
    assert json.loads((out / "results.json").read_text())["rows"][0]["kld"] == rows[0]["kld"]


def test_a_refined_file_is_kept_only_while_its_scores_are_the_same(tiny_model: Path) -> None:
    """A refined plan cannot be re-planned to compare, so the bench checks that its tensors carry the scores'
    errors: a file refined from an older oracle run (other scores) is built again."""
    from dataclasses import replace

    from ggufmix.bench.bench import planned_from
    from ggufmix.plan.budget import parse_budget
    from ggufmix.plan.planner import make_plan
    from ggufmix.score.measure import ScoreOptions, open_source, score_source

    src = open_source(tiny_model, False)
    scores = score_source(src, ScoreOptions(max_rows=32), None, progress=False)
    plan = make_plan(scores, parse_budget("4.5bpw"))
    assert planned_from(plan, scores)
    other = score_source(src, ScoreOptions(max_rows=16), None, progress=False)  # fewer rows: other errors
    assert not planned_from(plan, other)
    name = next(iter(plan.quantized())).name
    moved = replace(scores, tensors={**scores.tensors, name: replace(scores.tensors[name], errors={})})
    assert not planned_from(plan, moved)


def test_bench_adds_the_gptq_files_beside_the_plain_ones(tiny_model: Path, tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog, again and again. " * 60)
    out = tmp_path / "bench"

    def args(gptq_chunks: int) -> list[str]:
        return ["-q", "bench", str(tiny_model), "--text", str(text), "--calib", str(text), "--baselines", "Q4_K_M",
                "--modes", "imatrix", "--strategies", "measured", "--imatrix-chunks", "2", "--gptq-chunks",
                str(gptq_chunks), "--ctx", "64", "--chunks", "2", "-o", str(out)]
    res = CliRunner().invoke(cli, args(2))
    assert res.exit_code == 0, res.output
    rows = {r["kind"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert set(rows) == {"stock", "measured", "measured-gptq"}
    assert rows["measured-gptq"]["tensor_bytes"] == rows["measured"]["tensor_bytes"]
    assert rows["measured-gptq"]["kld"] != rows["measured"]["kld"]
    plan = json.loads((out / "ggufmix-measured-gptq-imatrix-Q4_K_M.plan.json").read_text())
    assert plan["settings"]["gptq"]["chunks"] == 2
    # a rerun with other --gptq-chunks builds that file again (same plan, other feedback); the others are kept
    kept = (out / "ggufmix-measured-imatrix-Q4_K_M.gguf").stat().st_mtime_ns
    res = CliRunner().invoke(cli, args(3))
    assert res.exit_code == 0, res.output
    plan = json.loads((out / "ggufmix-measured-gptq-imatrix-Q4_K_M.plan.json").read_text())
    assert plan["settings"]["gptq"]["chunks"] == 3
    assert (out / "ggufmix-measured-imatrix-Q4_K_M.gguf").stat().st_mtime_ns == kept
    res = CliRunner().invoke(cli, ["bench", str(tiny_model), "--text", str(text), "--modes", "none",
                                   "--gptq-chunks", "2", "-o", str(tmp_path / "b2")])
    assert res.exit_code != 0 and "--calib" in str(res.exception)
    res = CliRunner().invoke(cli, ["bench", str(tiny_model), "--text", str(text), "--calib", str(text),
                                   "--gptq-all", "-o", str(tmp_path / "b3")])
    assert res.exit_code != 0 and "--gptq-chunks" in str(res.exception)


def test_bench_adds_the_smoothed_files(tiny_model: Path, tmp_path: Path) -> None:
    """--smooth: a smoothed twin of every ggufmix file, same bytes, its alphas in the plan; the flag needs --calib."""
    calib = write_calib_text(tmp_path)
    out = tmp_path / "b1"
    res = CliRunner().invoke(cli, ["-q", "bench", str(loud_copy(tiny_model, tmp_path)), "--text", str(calib),
                                   "--baselines", "Q4_K_M", "--modes", "none", "--strategies", "measured", "--ctx",
                                   "64", "--chunks", "2", "-o", str(out), "--calib", str(calib), "--smooth"])
    assert res.exit_code == 0, res.output
    rows = {r["kind"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert set(rows) == {"stock", "measured", "measured-smooth"}
    assert rows["measured-smooth"]["tensor_bytes"] == rows["measured"]["tensor_bytes"]
    plan = json.loads((out / "ggufmix-measured-smooth-none-Q4_K_M.plan.json").read_text())
    assert plan["settings"]["smooth"]["head"]["alpha"] > 0
    assert "smooth" not in json.loads((out / "ggufmix-measured-none-Q4_K_M.plan.json").read_text())["settings"]
    path = out / "ggufmix-measured-smooth-none-Q4_K_M.plan.json"
    assert smoothed_alike(Plan.load(path))
    plan["settings"]["smooth"]["kind_gain"] = 0.1  # chosen by another rule: rebuilt
    path.write_text(json.dumps(plan))
    assert not smoothed_alike(Plan.load(path))
    res = CliRunner().invoke(cli, ["bench", str(tiny_model), "--text", str(calib), "--modes", "none",
                                   "--smooth", "-o", str(tmp_path / "b3")])
    assert res.exit_code != 0 and "--calib" in str(res.exception)
