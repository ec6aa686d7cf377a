"""Hugging Face models: folders and hub ids through llama.cpp's converter into ``ggufmix build``.

Tiny random models are written on the fly (tests/tinyhf.py). The converter is the real one, fetched
once per machine into the user cache from llama-cpp-python's source package on PyPI (or taken from
``$GGUFMIX_LLAMA_CPP``); each test gets its own ``GGUFMIX_CACHE`` for conversions.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from ggufmix.cli import cli
from ggufmix.errors import GgufmixError
from ggufmix.io import hf, llamacpp_src
from ggufmix.io.llamacpp_src import locate_converter

for _mod in ("torch", "transformers", "sentencepiece"):  # the converter's own dependencies (extra "hf")
    pytest.importorskip(_mod)

from tinyhf import FAMILIES, write_tiny_hf  # noqa: E402

REPO = Path(__file__).resolve().parents[1]




@pytest.fixture(scope="session")
def hf_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("hf")
    return {f: write_tiny_hf(base / f, f, seed=3) for f in FAMILIES}


def _build(model: str | Path, out: Path, *extra: str) -> object:
    args = ["-q", "build", str(model), "-o", str(out), "--budget", "5.0bpw", "--rows", "16", *extra]
    return CliRunner().invoke(cli, args)


@pytest.mark.parametrize("family,arch", [("llama", "llama"), ("qwen2", "qwen2"), ("gemma3", "gemma3")])
def test_build_from_folder(family: str, arch: str, hf_models: dict[str, Path], converter_cache: Path, tmp_path: Path) -> None:
    """A folder converts (bf16: the checkpoint is bfloat16), builds to budget, and llama.cpp generates from it."""
    out = tmp_path / "out.gguf"
    res = _build(hf_models[family], out)
    assert res.exit_code == 0, res.output
    assert "smoke test:" in res.output and "tensors verified" in res.output
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == arch
    converted = list((converter_cache / "converted").glob("*.gguf"))
    assert len(converted) == 1 and "-bf16-" in converted[0].name
    types = {t.tensor_type for t in gguf.GGUFReader(converted[0]).tensors if len(t.shape) > 1}
    assert types == {gguf.GGMLQuantizationType.BF16}


def test_second_build_reuses_conversion(hf_models: dict[str, Path], converter_cache: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = hf.run_converter
    monkeypatch.setattr(hf, "run_converter", lambda *a, **k: (calls.append(a[1]), real(*a, **k)))
    assert _build(hf_models["llama"], tmp_path / "a.gguf", "--no-smoke").exit_code == 0
    assert _build(hf_models["llama"], tmp_path / "b.gguf", "--no-smoke", "--budget", "4.0bpw").exit_code == 0
    assert len(calls) == 1
    assert _build(hf_models["llama"], tmp_path / "c.gguf", "--no-smoke", "--outtype", "f16").exit_code == 0
    assert len(calls) == 2  # another outtype is another conversion
    assert sorted(p.name.split("-")[1] for p in (converter_cache / "converted").glob("*.gguf")) == ["bf16", "f16"]


def test_sharded_checkpoint_converts_like_one_file(converter_cache: Path, tmp_path: Path) -> None:
    one = write_tiny_hf(tmp_path / "one", "qwen2", seed=5)
    three = write_tiny_hf(tmp_path / "three", "qwen2", seed=5, shards=3)
    assert (three / "model.safetensors.index.json").is_file() and len(list(three.glob("*.safetensors"))) == 3
    a, b = (hf.resolve_model(p, hf.HfOptions(progress=False)) for p in (one, three))
    ta = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(a).tensors}
    tb = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(b).tensors}
    assert ta.keys() == tb.keys() and all(np.array_equal(ta[n], tb[n]) for n in ta)


def _one_line_error(args: list[str], code: int, *needles: str) -> str:
    """The CLI fails with a GgufmixError (main() prints it as one line, exits with its code)."""
    res = CliRunner().invoke(cli, args)
    assert isinstance(res.exception, GgufmixError) and res.exception.exit_code == code, (res.exception, res.output)
    msg = str(res.exception)
    assert "\n" not in msg and all(n in msg for n in needles), msg
    return msg


def test_pickle_only_folder_is_refused(converter_cache: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    out = tmp_path / "o.gguf"
    _one_line_error(["-q", "build", str(folder), "-o", str(out), "--budget", "4bpw"], 2,
                    str(folder), "pickle", "safetensors")
    assert not out.exists() and not (converter_cache / "converted").exists()


def test_pickles_beside_safetensors_are_hidden_from_the_converter(converter_cache: Path, tmp_path: Path) -> None:
    """A fine-tune's training_args.bin is common; the converter gets a view without it (and converts)."""
    folder = write_tiny_hf(tmp_path / "finetune", "llama", seed=4)
    (folder / "training_args.bin").write_bytes(b"\x80\x04not really a pickle")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with hf.safetensors_view(folder) as view:
        assert view.name == "finetune" and view != folder
        assert sorted(f.name for f in view.iterdir()) == sorted(f.name for f in folder.iterdir()
                                                               if f.suffix != ".bin")
    assert not view.exists()
    res = CliRunner().invoke(cli, ["-q", "convert", str(folder)])
    assert res.exit_code == 0, res.output
    assert gguf.GGUFReader(res.output.split()[-1]).fields["general.name"].contents().lower() == "finetune"


def test_missing_shard_and_missing_config(hf_models: dict[str, Path], converter_cache: Path, tmp_path: Path) -> None:
    folder = write_tiny_hf(tmp_path / "sharded", "llama", shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    _one_line_error(["-q", "convert", str(folder)], 2, "model-00002-of-00002.safetensors", "index")
    _one_line_error(["-q", "convert", str(tmp_path)], 2, str(tmp_path), "config.json")
    _one_line_error(["-q", "convert", str(hf_models["llama"]), "--revision", "v1"], 2, "--revision")
    cut = write_tiny_hf(tmp_path / "cut", "llama")
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])  # an interrupted download
    _one_line_error(["-q", "convert", str(cut)], 2, str(cut / "model.safetensors"), "truncated")
    assert not (converter_cache / "converted").exists()


def test_custom_code_is_refused(converter_cache: Path, tmp_path: Path) -> None:
    folder = write_tiny_hf(tmp_path / "custom", "llama")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoConfig": "modeling_x.XConfig"}}))
    (folder / "modeling_x.py").write_text("raise SystemExit('never run')\n")
    _one_line_error(["-q", "convert", str(folder)], 2, "modeling_x.py", "remote-code")


def _hub_snapshot(hub: Path, repo: str, ref: str, commit: str, source: Path) -> None:
    """The hub cache layout huggingface_hub reads offline: refs/<ref> -> snapshots/<commit>/ -> blobs."""
    root = hub / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    (root / "blobs").mkdir(exist_ok=True)
    for f in source.iterdir():
        blob = root / "blobs" / f"{commit[:8]}-{f.name}"
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(commit)


def _ggufmix(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ggufmix", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **env})


def test_hub_id_from_offline_cache(converter_cache: Path, tmp_path: Path) -> None:
    """The real huggingface_hub resolves owner/name and --revision from HF_HOME with HF_HUB_OFFLINE=1."""
    hub = tmp_path / "hf_home" / "hub"
    _hub_snapshot(hub, "tiny-org/tiny-llama", "main", "a" * 40, write_tiny_hf(tmp_path / "m", "llama", seed=1))
    _hub_snapshot(hub, "tiny-org/tiny-llama", "v2", "b" * 40, write_tiny_hf(tmp_path / "v2", "llama", seed=2))
    env = {"HF_HOME": str(hub.parent), "HF_HUB_OFFLINE": "1", "GGUFMIX_CACHE": str(converter_cache)}
    main = _ggufmix("-q", "convert", "tiny-org/tiny-llama", env=env)
    v2 = _ggufmix("-q", "convert", "tiny-org/tiny-llama", "--revision", "v2", env=env)
    assert main.returncode == 0 and v2.returncode == 0, main.stderr + v2.stderr
    a, b = Path(main.stdout.split()[-1]), Path(v2.stdout.split()[-1])
    assert a.is_file() and b.is_file() and a != b and a.name.startswith("tiny-llama-bf16-")
    wa = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(a).tensors}
    wb = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(b).tensors}
    assert not np.array_equal(wa["blk.0.ffn_down.weight"], wb["blk.0.ffn_down.weight"])  # seeds 1 and 2
    out = tmp_path / "out.gguf"
    built = _ggufmix("-q", "build", "tiny-org/tiny-llama", "-o", str(out), "--budget", "4.5bpw", "--rows", "16",
                     "--no-smoke", env=env)
    assert built.returncode == 0 and out.is_file(), built.stderr
    missing = _ggufmix("-q", "convert", "tiny-org/not-there", env=env)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr
    assert "tiny-org/not-there" in missing.stderr and "Traceback" not in missing.stderr


def test_missing_converter_dependency_is_one_line(hf_models: dict[str, Path], converter_cache: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The real converter, in a Python where sentencepiece cannot be imported, names what to install."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'sentencepiece':\n"
        "            raise ModuleNotFoundError(f\"No module named '{name}'\", name=name)\n"
        "sys.meta_path.insert(0, _Block())\n")
    monkeypatch.setenv("PYTHONPATH", str(site))
    msg = _one_line_error(["-q", "convert", str(hf_models["llama"])], 6, "sentencepiece", "pip install 'ggufmix[hf]'")
    assert str(hf_models["llama"]) in msg
    assert not list((converter_cache / "converted").iterdir())  # no half-written conversion


def test_missing_torch_is_caught_before_running(hf_models: dict[str, Path], converter_cache: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    real = llamacpp_src.importlib.util.find_spec
    monkeypatch.setattr(llamacpp_src.importlib.util, "find_spec", lambda n, *a: None if n == "torch" else real(n, *a))
    _one_line_error(["-q", "convert", str(hf_models["qwen2"])], 6, "torch", "pip install 'ggufmix[hf]'")


def test_converter_failure_is_one_line(hf_models: dict[str, Path], converter_cache: Path, tmp_path: Path) -> None:
    fake = tmp_path / "llama.cpp"
    fake.mkdir()
    (fake / "convert_hf_to_gguf.py").write_text(
        "import sys\nprint('INFO:hf-to-gguf:Loading model')\n"
        "print('ERROR:hf-to-gguf:Model FancyForCausalLM is not supported', file=sys.stderr)\nsys.exit(1)\n")
    msg = _one_line_error(["-q", "convert", str(hf_models["llama"]), "--llama-cpp-dir", str(fake)], 4,
                          "FancyForCausalLM is not supported", "exit 1")
    assert str(hf_models["llama"]) in msg
    assert not [p for p in (converter_cache / "converted").iterdir()]
    _one_line_error(["-q", "convert", str(hf_models["llama"]), "--llama-cpp-dir", str(tmp_path)], 2,
                    "convert_hf_to_gguf.py", "--llama-cpp-dir")


def _fake_sdist(path: Path) -> Path:
    import io
    import tarfile

    files = {"vendor/llama.cpp/convert_hf_to_gguf.py": "print('converter')\n",
             "vendor/llama.cpp/conversion/__init__.py": "", "vendor/llama.cpp/gguf-py/gguf/__init__.py": "",
             "vendor/llama.cpp/LICENSE": "MIT", "vendor/llama.cpp/src/llama.cpp": "// not needed",
             "vendor/llama.cpp/gguf-py/tests/test_x.py": "", "llama_cpp/__init__.py": ""}
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            info = tarfile.TarInfo(f"llama_cpp_python-9.9.9/{name}")
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text.encode()))
    return path


def test_fetch_extracts_only_the_converter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GGUFMIX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(llamacpp_src.ENV_VAR, raising=False)
    monkeypatch.setattr(llamacpp_src, "llama_cpp_python_version", lambda: "9.9.9")
    downloads = []
    monkeypatch.setattr(llamacpp_src, "download_sdist",
                        lambda v, into: (downloads.append(v), _fake_sdist(into / "x.tar.gz"))[1])
    conv = locate_converter()
    assert conv.version == "9.9.9" and conv.root == tmp_path / "cache" / "llama.cpp-9.9.9"
    got = sorted(str(p.relative_to(conv.root)) for p in conv.root.rglob("*") if p.is_file())
    assert got == ["LICENSE", "conversion/__init__.py", "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py"]
    locate_converter()
    assert downloads == ["9.9.9"]  # the second call finds it in the cache


def test_hf_modules_stay_lean() -> None:
    code = ("import sys, ggufmix.io.hf, ggufmix.io.safetensors_header, ggufmix.io.llamacpp_src; "
            "bad = [m for m in ('torch', 'transformers', 'huggingface_hub', 'llama_cpp') if m in sys.modules]; "
            "print(bad); sys.exit(bool(bad))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr
