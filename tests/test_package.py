"""Modelfile (golden files), bundle contents and checksums, --fit checked by llama.cpp's own numbers."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from golden_inputs import CASES

from ggufmix.cli import cli
from ggufmix.engine.memory import measure_buffers
from ggufmix.package.modelfile import default_system, detect_family, modelfile
from ggufmix.package.ship import run_ollama

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
