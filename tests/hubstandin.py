"""A local stand-in for the Hugging Face Hub's upload API, enough for huggingface_hub's ``create_repo`` and
``upload_folder`` (preupload, LFS batch with the basic transfer, LFS PUT, ndjson commit) and ``get_paths_info``.

It stores what a real hub would: regular files inline, LFS files by their SHA-256 (checked on upload), and
refuses requests without the expected token (401) like the hub does. Point huggingface_hub at it with
``HF_ENDPOINT=stand.url``. No third-party code: the protocol is read from huggingface_hub's client calls.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

TOKEN = "hf_standin_write_token"
_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"


class HubStandIn:
    """``with HubStandIn(root) as hub:`` serves on 127.0.0.1; ``hub.files(repo)`` is what a repo holds."""

    def __init__(self, root: Path, token: str = TOKEN) -> None:
        self.root, self.token = root, token
        self.requests: list[str] = []
        self.cards: list[dict[str, object]] = []  # README.md metadata that passed validation
        self._lfs: dict[str, bytes] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> HubStandIn:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def files(self, repo: str) -> dict[str, bytes]:
        base = self.root / repo
        return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, body: object) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                hub.requests.append(f"POST {self.path}")
                body = self._body()
                if self.headers.get("Authorization") != f"Bearer {hub.token}":
                    return self._send(401, {"error": "Invalid username or password."})
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    req = json.loads(body)
                    repo = f"{req.get('organization') or 'user'}/{req['name']}"
                    if (hub.root / repo).exists():
                        return self._send(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo}"})
                    (hub.root / repo).mkdir(parents=True)
                    return self._send(200, {"url": f"{hub.url}/{repo}", "name": repo})
                if path == "/api/validate-yaml":
                    return self._validate_yaml(json.loads(body)["content"])
                if m := re.fullmatch(rf"/api/models/{_REPO}/preupload/[^/]+", path):
                    if not (hub.root / m["repo"]).is_dir():
                        return self._send(404, {"error": "Repository not found"})
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [
                        {"path": f["path"], "uploadMode": "lfs" if f["size"] > 1024 else "regular",
                         "shouldIgnore": False, "oid": None} for f in files]})
                if re.fullmatch(rf"/{_REPO}\.git/info/lfs/objects/batch", path):
                    objects = json.loads(body)["objects"]
                    return self._send(200, {"transfer": "basic", "objects": [
                        {"oid": o["oid"], "size": o["size"], "authenticated": True,
                         "actions": {"upload": {"href": f"{hub.url}/lfs/{o['oid']}"}}} for o in objects]})
                if m := re.fullmatch(rf"/api/models/{_REPO}/commit/[^/]+", path):
                    return self._commit(m["repo"], body)
                if m := re.fullmatch(rf"/api/models/{_REPO}/paths-info/[^/]+", path):
                    return self._paths_info(m["repo"], parse_qs(body.decode())["paths"])
                return self._send(404, {"error": f"stand-in has no route {path}"})

            def do_PUT(self) -> None:  # noqa: N802
                hub.requests.append(f"PUT {self.path}")
                data = self._body()
                oid = self.path.rsplit("/", 1)[-1]
                if hashlib.sha256(data).hexdigest() != oid:
                    return self._send(400, {"error": "content does not match its oid"})
                hub._lfs[oid] = data
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _commit(self, repo: str, body: bytes) -> None:
                base = hub.root / repo
                for line in body.splitlines():
                    item = json.loads(line)
                    value = item["value"]
                    if item["key"] == "file":
                        data = base64.b64decode(value["content"])
                    elif item["key"] == "lfsFile":
                        if value["oid"] not in hub._lfs:
                            return self._send(400, {"error": f"LFS object {value['oid']} was never uploaded"})
                        data = hub._lfs[value["oid"]]
                    else:
                        continue
                    (base / value["path"]).parent.mkdir(parents=True, exist_ok=True)
                    (base / value["path"]).write_bytes(data)
                oid = hashlib.sha1(body).hexdigest()
                self._send(200, {"commitUrl": f"{hub.url}/{repo}/commit/{oid}", "commitOid": oid,
                                 "pullRequestUrl": None})

            def _validate_yaml(self, content: str) -> None:
                """The card's metadata must be a YAML mapping between leading ``---`` lines, as on the hub."""
                import yaml

                m = re.match(r"---\n(.*?)\n---\n", content, re.S)
                try:
                    meta = yaml.safe_load(m[1]) if m else None
                except yaml.YAMLError as e:
                    return self._send(400, {"errors": [{"message": f"invalid YAML: {e}"}]})
                if not isinstance(meta, dict):
                    return self._send(200, {"warnings": [{"message": "empty or missing yaml metadata in repo card"}]})
                hub.cards.append(meta)
                return self._send(200, {})

            def _paths_info(self, repo: str, paths: list[str]) -> None:
                out = []
                for p in paths:
                    f = hub.root / repo / p
                    if not f.is_file():
                        continue
                    data = f.read_bytes()
                    entry = {"type": "file", "path": p, "size": len(data),
                             "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
                    if len(data) > 1024:
                        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                    out.append(entry)
                self._send(200, out)

        return Handler
