"""``--push`` / ``ggufmix push`` through the real huggingface_hub client against a local stand-in hub.

The pushes run as fresh ``python -m ggufmix`` processes with ``HF_ENDPOINT`` set, as a user would run them:
huggingface_hub reads HF_ENDPOINT once, at import, and an earlier test may already have imported it.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from hubstandin import TOKEN, HubStandIn

from ggufmix.cli import cli


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    with HubStandIn(tmp_path_factory.mktemp("hub")) as h:
        yield h


def ggufmix(hub: HubStandIn, *args: str, token: str = TOKEN, endpoint: str | None = None) -> subprocess.CompletedProcess:
    env = os.environ | {"HF_ENDPOINT": endpoint or hub.url, "HF_TOKEN": token, "HF_HUB_DISABLE_TELEMETRY": "1"}
    return subprocess.run([sys.executable, "-m", "ggufmix", "-q", *args], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def bundle(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("push") / "bundle"
    res = CliRunner().invoke(cli, ["-q", "build", str(tiny_model), "--budget", "4.5bpw", "--bundle", str(out),
                                   "--rows", "32", "--no-smoke"])
    assert res.exit_code == 0, res.output
    return out


def test_build_push_uploads_the_bundle_byte_for_byte(tiny_model: Path, tmp_path: Path, hub: HubStandIn) -> None:
    out = tmp_path / "b"
    res = ggufmix(hub, "build", str(tiny_model), "--budget", "4.5bpw", "--bundle", str(out), "--rows", "32",
                  "--no-smoke", "--push", "me/tiny-gguf")
    assert res.returncode == 0, (res.stderr, hub.requests)
    assert "pushed" in res.stdout and "me/tiny-gguf" in res.stdout
    stored = hub.files("me/tiny-gguf")
    assert set(stored) == {p.name for p in out.iterdir()}
    for name, data in stored.items():
        assert data == (out / name).read_bytes(), name
    assert hub.cards and hub.cards[-1]["library_name"] == "gguf" and "ggufmix" in hub.cards[-1]["tags"]
    # model.gguf went through LFS (uploaded by SHA-256), the small files inline
    assert f"PUT /lfs/{hashlib.sha256((out / 'model.gguf').read_bytes()).hexdigest()}" in hub.requests


def test_push_command_and_second_push_to_an_existing_repo(bundle: Path, hub: HubStandIn) -> None:
    for _ in range(2):  # the second push finds the repository (409) and commits again
        res = ggufmix(hub, "push", str(bundle), "me/again")
        assert res.returncode == 0, res.stderr
    assert hub.files("me/again")["SHA256SUMS"] == (bundle / "SHA256SUMS").read_bytes()


def test_hub_errors_are_one_line(bundle: Path, hub: HubStandIn) -> None:
    res = ggufmix(hub, "push", str(bundle), "me/x", token="hf_wrong")
    assert res.returncode == 7 and res.stderr.count("\n") == 1
    assert "not authorised" in res.stderr and "HF_TOKEN" in res.stderr
    res = ggufmix(hub, "push", str(bundle), "me/x", endpoint="http://127.0.0.1:9")  # nothing listens there
    assert res.returncode == 7 and res.stderr.count("\n") == 1 and "could not be reached" in res.stderr


def test_push_input_errors(bundle: Path, tmp_path: Path) -> None:
    from ggufmix.errors import InputError, UsageError
    from ggufmix.ship.push import push_bundle

    with pytest.raises(UsageError, match="owner/name|not a Hugging Face repository id"):
        push_bundle(bundle, "no-owner")
    with pytest.raises(UsageError, match="not a Hugging Face repository id"):
        push_bundle(bundle, "me/bad name!")
    changed = tmp_path / "changed"
    changed.mkdir()
    for p in bundle.iterdir():
        (changed / p.name).write_bytes(p.read_bytes())
    (changed / "Modelfile").write_text("FROM ./other.gguf\n")
    with pytest.raises(InputError, match="Modelfile: changed since the bundle was written"):
        push_bundle(changed, "me/x")
    with pytest.raises(InputError, match="not a ggufmix bundle"):
        push_bundle(tmp_path, "me/x")


def test_push_needs_a_bundle_and_is_checked_before_building(tiny_model: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["build", str(tiny_model), "--budget", "4.5bpw", "-o", str(tmp_path / "m.gguf"),
                                   "--push", "me/x"])
    assert res.exit_code != 0 and "--push needs --bundle" in res.output
    res = CliRunner().invoke(cli, ["build", str(tiny_model), "--budget", "4.5bpw", "--bundle", str(tmp_path / "b"),
                                   "--push", "bad"])
    assert res.exit_code != 0 and not (tmp_path / "b").exists()
