"""``--push REPO`` / ``ggufmix push DIR REPO``: upload a bundle to a Hugging Face model repository.

huggingface_hub does the work (``create_repo(exist_ok=True)`` then one ``upload_folder`` commit: model.gguf goes
through LFS, the small files inline). Its own settings apply: ``HF_TOKEN`` or a saved ``hf auth login``,
``HF_ENDPOINT`` for a mirror or a private hub (huggingface_hub reads it once, when it is imported).
Before uploading, the bundle is checked against its SHA256SUMS; afterwards the hub's LFS record of model.gguf
(its SHA-256) is compared with the bundle's, so a push that reports success really holds our bytes.
"""
from __future__ import annotations

from pathlib import Path

from ggufmix.errors import HubError, InputError, MissingDependencyError, UsageError
from ggufmix.ship.bundle import CHECKSUMS, sha256

MODEL = "model.gguf"


def check_repo_id(repo: str) -> str:
    """``owner/name`` as the hub spells repository ids.

    Raises:
        UsageError: not a valid repository id.
    """
    hub = _hub()
    try:
        hub.utils.validate_repo_id(repo)
    except hub.errors.HFValidationError as e:
        raise UsageError(f"--push {repo!r}: not a Hugging Face repository id ({str(e).splitlines()[0]})") from None
    if repo.count("/") != 1:
        raise UsageError(f"--push {repo!r}: give the repository as owner/name")
    return repo


def read_checksums(bundle: Path) -> dict[str, str]:
    """The bundle's SHA256SUMS, each file checked against it.

    Raises:
        InputError: no SHA256SUMS, a listed file missing or changed since the bundle was written.
    """
    sums = bundle / CHECKSUMS
    try:
        lines = sums.read_text().splitlines()
    except OSError:
        raise InputError(f"{bundle}: not a ggufmix bundle (no readable {CHECKSUMS})") from None
    want = {}
    for ln in lines:
        digest, _, name = ln.partition("  ")  # sha256sum's "DIGEST  NAME"
        if name.strip():
            want[name.strip()] = digest.strip()
    if MODEL not in want:
        raise InputError(f"{sums}: does not list {MODEL}")
    for name, digest in want.items():
        if not (bundle / name).is_file():
            raise InputError(f"{bundle / name}: listed in {CHECKSUMS} but missing")
        if sha256(bundle / name) != digest:
            raise InputError(f"{bundle / name}: changed since the bundle was written (SHA-256 differs from {CHECKSUMS})")
    return want


def push_bundle(bundle: Path, repo: str, *, private: bool = False, message: str | None = None,
                progress: bool = True) -> str:
    """Upload every file of ``bundle`` to the model repository ``repo`` in one commit; the commit's URL.

    Raises:
        InputError: the bundle does not match its checksums.
        UsageError: a bad repository id.
        HubError: the hub refused (credentials, permissions) or could not be reached, or holds other bytes after
            the upload.
        MissingDependencyError: huggingface_hub is not installed.
    """
    hub = _hub()
    check_repo_id(repo)
    want = read_checksums(bundle)
    if not progress:
        hub.utils.disable_progress_bars()
    api = hub.HfApi()  # its endpoint is huggingface_hub's: HF_ENDPOINT as it was when huggingface_hub was imported
    where = f"{repo} on {hub.constants.ENDPOINT}"
    try:
        api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo, repo_type="model", folder_path=str(bundle),
                                 commit_message=message or "ggufmix bundle", allow_patterns=sorted(want) + [CHECKSUMS])
        remote = api.get_paths_info(repo, [MODEL], repo_type="model", revision=info.oid)
    except Exception as e:  # noqa: BLE001 - huggingface_hub raises requests', its own and OS errors alike
        raise HubError(f"{where}: push failed: {_reason(hub, e)}") from None
    lfs = getattr(remote[0], "lfs", None) if remote else None
    got = lfs.sha256 if lfs is not None else None
    if got != want[MODEL]:
        raise HubError(f"{where}: after the upload the hub's {MODEL} has SHA-256 {got}, the bundle's is {want[MODEL]}")
    return str(info.commit_url)


def _reason(hub, e: Exception) -> str:  # noqa: ANN001
    import requests

    status = getattr(getattr(e, "response", None), "status_code", None)
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if status == 401:
        return f"not authorised ({first}); set HF_TOKEN or run `hf auth login` with a token that can write"
    if status == 403:
        return f"forbidden ({first}); the token cannot write to this repository"
    if status is None and isinstance(e, (requests.ConnectionError, requests.Timeout)):
        return f"the hub could not be reached ({first})"
    return first


def _hub():  # noqa: ANN202
    try:
        import huggingface_hub
        import huggingface_hub.constants
        import huggingface_hub.errors
        import huggingface_hub.utils
    except ImportError:
        raise MissingDependencyError("--push needs huggingface_hub: pip install 'ggufmix[hf]'") from None
    return huggingface_hub
