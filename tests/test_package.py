"""Modelfile (golden files), bundle contents and checksums, --fit checked by llama.cpp's own numbers."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from golden_inputs import CASES

from ggufmix.cli import cli
from ggufmix.engine.buffers import measure_buffers
from ggufmix.ship.modelfile import default_system, detect_family, modelfile
from ggufmix.ship.fit import run_ollama

GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.parametrize("case", sorted(CASES))
def test_modelfile_matches_golden(case: str) -> None:
    template, kw = CASES[case]
    assert modelfile("model.gguf", template, **kw) == (GOLDEN / f"{case}.Modelfile").read_text()


def test_template_families_and_default_system() -> None:
    qwen = "{{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}<|im_start|>"
    fam = detect_family(qwen)
    assert fam is not None and fam.name == "chatml"
    assert default_system(fam, qwen) == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    assert detect_family(CASES["gemma3"][0]).stops == ("<end_of_turn>",)
    assert detect_family("<|start_header_id|>").name == "llama3"
    assert detect_family(None) is None and detect_family(CASES["unknown"][0]) is None


def _sums(folder: Path) -> dict[str, str]:
    lines = (folder / "SHA256SUMS").read_text().splitlines()
    return {ln.split("  ")[1]: ln.split("  ")[0] for ln in lines}


def test_bundle_contents_and_checksums(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    args = ["-q", "build", str(tiny_model), "--budget", "4.5bpw", "--bundle", str(out), "--rows", "32", "--no-smoke",
            "--ollama", "tiny-test"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    names = {p.name for p in out.iterdir()}
    assert {"model.gguf", "Modelfile", "README.md", "recipe.txt", "plan.json", "build.json", "SHA256SUMS",
            "layers.png"} <= names
    sums = _sums(out)
    assert set(sums) == names - {"SHA256SUMS"}
    for name, digest in sums.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name
    assert (out / "Modelfile").read_text().startswith("FROM ./model.gguf\n")
    assert json.loads((out / "plan.json").read_text())["totals"]["bpw"] <= 4.5
    assert "--tensor-type-file recipe.txt" in (out / "README.md").read_text()
    assert "ollama create tiny-test -f" in res.output or "ollama:" in res.output
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no staging folder left
    again = CliRunner().invoke(cli, args)
    assert again.exit_code != 0 and "already exists" in str(again.exception or again.output)


def test_fit_is_checked_by_llama_cpp(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "fit"
    res = CliRunner().invoke(cli, ["-q", "build", str(tiny_model), "--fit", "4MB", "--ctx", "256", "--ubatch", "32",
                                   "--bundle", str(out), "--rows", "32", "--no-smoke"])
    assert res.exit_code == 0, res.output
    assert "= weights budget" in res.output and "llama.cpp measured" in res.output
    measured = measure_buffers(out / "model.gguf", n_ctx=256, n_ubatch=32)
    assert measured.total <= 4_000_000
    text = (out / "Modelfile").read_text()
    assert "PARAMETER num_ctx 256" in text and "PARAMETER use_mmap false" in text
    assert "## Memory budget" in (out / "README.md").read_text()


def test_fit_errors(tiny_model: Path, tmp_path: Path) -> None:
    r = CliRunner()
    res = r.invoke(cli, ["build", str(tiny_model), "--fit", "1MB", "--ctx", "4096", "-o", str(tmp_path / "x.gguf")])
    assert res.exit_code != 0 and "leave nothing for the weights" in str(res.exception)
    res = r.invoke(cli, ["build", str(tiny_model), "--fit", "4MB", "--budget", "4bpw", "-o", str(tmp_path / "x.gguf")])
    assert res.exit_code != 0 and "one of --budget" in res.output
    assert not list(tmp_path.iterdir())


def test_ollama_missing_prints_the_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    msg = run_ollama(tmp_path, "m")
    assert "ollama is not on PATH" in msg and f"ollama create m -f {tmp_path}/Modelfile" in msg


def test_palette_ollama_by_architecture(tiny_model: Path, tmp_path: Path) -> None:
    """llama runs through Ollama's llama.cpp: everything but types newer than Ollama knows (Q2_0); an architecture
    Ollama's own engine serves (qwen3) gets no IQ types, checked on a real plan from real scores."""
    import json

    from ggufmix.ship.palettes import named_palette, ollama_engine_misfits
    from ggufmix.types import DEFAULT_TYPES, QuantType

    llama, _ = named_palette("ollama", "llama")
    assert set(DEFAULT_TYPES) - set(llama) == {QuantType.Q2_0}
    qwen3, why = named_palette("ollama", "qwen3")
    assert "own engine" in why and not any(t.name.startswith("IQ") for t in qwen3) and QuantType.Q4_K in qwen3
    assert ollama_engine_misfits("gemma3", {"IQ4_XS", "Q4_K", "F32"}) == ["IQ4_XS"]
    assert ollama_engine_misfits("llama", {"IQ4_XS", "Q4_K"}) == []

    scores = tmp_path / "s.json"
    assert CliRunner().invoke(cli, ["-q", "score", str(tiny_model), "-o", str(scores), "--rows", "32"]).exit_code == 0
    doc = json.loads(scores.read_text())
    doc["arch"] = "qwen3"  # the same tensors, planned as if Ollama's engine served the model
    scores.write_text(json.dumps(doc))
    for palette, budget in ((None, "3.2bpw"), ("ollama", "3.2bpw")):
        out = tmp_path / f"plan-{palette}.json"
        args = ["plan", str(scores), "--budget", budget, "-o", str(out)] + (["--palette", palette] if palette else [])
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 0, res.output
        used = {e["type"] for e in json.loads(out.read_text())["tensors"]}
        if palette is None:
            assert any(t.startswith("IQ") for t in used)  # the default palette does use them at 3.2 bpw
        else:
            assert "own engine" in res.output and not any(t.startswith("IQ") for t in used), used
    res = CliRunner().invoke(cli, ["plan", str(scores), "--budget", "5bpw", "-o", str(tmp_path / "x.json"),
                                   "--palette", "ollama", "--types", "IQ4_XS,IQ3_S"])
    assert res.exit_code != 0 and "none of them is in --palette ollama" in str(res.exception or res.output)


def test_fit_on_a_device_bigger_than_the_model_gives_its_largest_file(tiny_model: Path, tmp_path: Path) -> None:
    """--fit is a ceiling: a 16 GB Mac and a 3 MB model give the best file the palette makes, not an error,
    while the same size as --budget (a target) is still refused with the feasible range."""
    scores = tmp_path / "s.json"
    r = CliRunner()
    assert r.invoke(cli, ["-q", "score", str(tiny_model), "-o", str(scores), "--rows", "16"]).exit_code == 0
    res = r.invoke(cli, ["plan", str(scores), "--fit", "mac-16gb", "--ctx", "256", "-o", str(tmp_path / "p.json")])
    assert res.exit_code == 0, res.output
    plan = json.loads((tmp_path / "p.json").read_text())
    assert {t["type"] for t in plan["tensors"]} == {"Q8_0", "F32"}, plan["totals"]  # the palette's largest, norms F32
    res = r.invoke(cli, ["plan", str(scores), "--budget", "16GB", "-o", str(tmp_path / "q.json")])
    assert res.exit_code != 0 and "not achievable" in str(res.exception)
