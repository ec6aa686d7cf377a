"""Backend palettes (data/backends.json, read off llama.cpp's supports_op by scripts/gen_backends.py) in real plans."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from ggufmix.cli import cli
from ggufmix.errors import UsageError
from ggufmix.ship.devices import load_devices
from ggufmix.ship.palettes import named_palette
from ggufmix.types import QuantType

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scores(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pal") / "s.json"
    res = CliRunner().invoke(cli, ["-q", "score", str(tiny_model), "-o", str(out), "--rows", "32"])
    assert res.exit_code == 0, res.output
    return out


def test_backend_palettes_differ_as_their_kernels_do() -> None:
    adreno, why = named_palette("adreno", "llama")
    assert "adreno backend multiplies" in why
    names = {t.name for t in adreno}
    assert {"Q4_0", "Q4_K", "Q6_K", "Q8_0"} <= names and not any(n.startswith("IQ2") for n in names)
    assert "Q2_K" not in names and "Q3_K" not in names
    cuda = {t.name for t in named_palette("cuda", "llama")[0]}
    assert {"IQ2_XS", "Q2_K", "Q3_K", "IQ4_XS"} <= cuda and names < cuda
    arm, why = named_palette("cpu-arm", "llama")
    assert QuantType.IQ2_XS in arm and "repacks" in why and "Q4_0" in why


def test_plan_with_adreno_palette_uses_only_its_types(scores: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    res = CliRunner().invoke(cli, ["plan", str(scores), "--budget", "5.0bpw", "-o", str(out), "--palette", "adreno"])
    assert res.exit_code == 0, res.output
    allowed = {t.name for t in named_palette("adreno", "llama")[0]} | {"F32", "F16", "BF16"}
    used = {e["type"] for e in json.loads(out.read_text())["tensors"]}
    assert used <= allowed and len(used) > 1, used


@pytest.mark.parametrize("extra", [["--pin", r"attn_q=IQ2_XS"], ["--types", "Q4_K,IQ3_S,Q6_K"]])
def test_type_outside_the_palette_is_refused(scores: Path, tmp_path: Path, extra: list[str]) -> None:
    res = CliRunner().invoke(cli, ["plan", str(scores), "--budget", "4.5bpw", "-o", str(tmp_path / "x.json"),
                                   "--palette", "adreno", *extra])
    assert isinstance(res.exception, UsageError) and res.exception.exit_code == 2, res.output
    msg = str(res.exception)
    assert "\n" not in msg and "not in --palette adreno" in msg and ("IQ2_XS" in msg or "IQ3_S" in msg)
    assert not (tmp_path / "x.json").exists()


def test_device_profiles_name_their_palette() -> None:
    devices = load_devices()
    assert devices["galaxy-s24-ultra"].palette == "adreno" and devices["rpi5-8gb"].palette == "cpu-arm"
    assert devices["mac-16gb"].palette == "metal" and devices["gpu-8gb"].palette == "cuda"
    for d in devices.values():
        assert d.palette is not None
        named_palette(d.palette, "llama")


def test_backends_json_regenerates_from_the_sdist(tmp_path: Path) -> None:
    """Golden: the committed data equals what scripts/gen_backends.py reads off llama.cpp (GGUFMIX_LLAMA_SDIST)."""
    sdist = os.environ.get("GGUFMIX_LLAMA_SDIST")
    if not sdist:
        pytest.skip("set GGUFMIX_LLAMA_SDIST to the unpacked llama-cpp-python 0.3.36 sdist")
    import subprocess
    import sys

    out = tmp_path / "backends.json"
    subprocess.run([sys.executable, str(REPO / "scripts" / "gen_backends.py"), sdist, "-o", str(out)], check=True,
                   capture_output=True)
    assert json.loads(out.read_text()) == json.loads((REPO / "ggufmix" / "data" / "backends.json").read_text())
