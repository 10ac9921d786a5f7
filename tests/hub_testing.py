"""
Stand-ins for the Hugging Face Hub, which is unreachable where the tests run.

`FakeHub` is a local HTTP server implementing the endpoints `huggingface_hub` calls for `create_repo`,
`create_branch` and `upload_folder` (without `hf_xet`: README metadata check, preupload, LFS batch + basic transfer,
commit), and records what it receives.
`write_hub_cache` lays out a model repository in the real Hub cache format (`models--org--name/blobs`,
`snapshots/<commit>`, `refs/main`), so that offline loading by repo id goes through `huggingface_hub`'s own code.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


@dataclass
class HubRepo:
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[dict[str, Any]] = field(default_factory=list)
    private: bool | None = None
    repo_type: str = "model"
    branches: set[str] = field(default_factory=lambda: {"main"})


class FakeHub:
    """`with FakeHub() as hub:` serves on `hub.url`; `hub.repos`, `hub.requests`, `hub.tokens` record traffic."""

    LFS_SUFFIXES = (".safetensors", ".bin", ".gguf")

    def __init__(self) -> None:
        self.repos: dict[str, HubRepo] = {}
        self.requests: list[tuple[str, str]] = []
        self.request_tokens: list[tuple[str, str | None]] = []
        self.lfs_objects: dict[str, bytes] = {}
        self.unhandled: list[tuple[str, str]] = []
        self.card_metadata: list[dict[str, Any]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:
                hub._handle(self, "POST")

            def do_PUT(self) -> None:
                hub._handle(self, "PUT")

            def do_GET(self) -> None:
                hub._handle(self, "GET")

            def do_HEAD(self) -> None:
                hub._handle(self, "HEAD")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def tokens(self) -> set[str | None]:
        """Tokens sent to the endpoints of an upload (LFS content goes to pre-signed URLs, without one)."""
        skipped = {path for _, path in self.unhandled}
        return {token for path, token in self.request_tokens if path not in skipped and "/lfs-upload/" not in path}

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ------------------------------------------------------------------ endpoints

    def _handle(self, request: BaseHTTPRequestHandler, method: str) -> None:
        path = request.path.split("?")[0]
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else b""
        self.requests.append((method, path))
        authorization = request.headers.get("Authorization")
        self.request_tokens.append((path, authorization.removeprefix("Bearer ") if authorization else None))
        parts = path.strip("/").split("/")
        if method == "POST" and path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}"
            url = {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id}
            if repo_id in self.repos:  # the Hub keeps the existing repo (and its visibility) and answers 409
                return self._reply(request, {"error": "You already created this model repo", **url}, status=409)
            self.repos[repo_id] = HubRepo(
                private=payload.get("visibility") == "private", repo_type=payload.get("type") or "model"
            )
            return self._reply(request, url)
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(request, json.loads(body)["content"])
        if (
            method == "POST"
            and len(parts) == 6
            and parts[0] == "api"
            and parts[1] in ("models", "datasets")
            and parts[4] == "preupload"
        ):
            files = json.loads(body)["files"]
            modes = [
                {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(self.LFS_SUFFIXES) else "regular"}
                for f in files
            ]
            return self._reply(request, {"files": [{**m, "shouldIgnore": False} for m in modes]})
        if method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
            objects = json.loads(body)["objects"]
            actions = [
                {**o, "actions": {"upload": {"href": f"{self.url}/lfs-upload/{o['oid']}"}}}
                if o["oid"] not in self.lfs_objects
                else o  # already stored: no action, as the Hub answers
                for o in objects
            ]
            return self._reply(request, {"transfer": "basic", "objects": actions})
        if method == "PUT" and len(parts) == 2 and parts[0] == "lfs-upload":
            if hashlib.sha256(body).hexdigest() != parts[1]:
                return self._reply(request, {"error": "sha256 mismatch"}, status=400)
            self.lfs_objects[parts[1]] = body
            return self._reply(request, {})
        if (
            method == "POST"
            and len(parts) == 6
            and parts[0] == "api"
            and parts[1] in ("models", "datasets")
            and parts[4] == "branch"
        ):
            repo = self.repos[f"{parts[2]}/{parts[3]}"]
            if parts[5] in repo.branches:
                return self._reply(request, {"error": "Reference already exists"}, status=409)
            repo.branches.add(parts[5])
            return self._reply(request, {})
        if (
            method == "POST"
            and len(parts) == 6
            and parts[0] == "api"
            and parts[1] in ("models", "datasets")
            and parts[4] == "commit"
        ):
            repo_id = f"{parts[2]}/{parts[3]}"
            if repo_id not in self.repos:
                return self._reply(request, {"error": f"Repository {repo_id} not found"}, status=404)
            if parts[5] not in self.repos[repo_id].branches:
                return self._reply(request, {"error": f"Invalid rev id: {parts[5]}"}, status=404)
            return self._commit(request, repo_id, parts[5], body)
        self.unhandled.append((method, path))
        self._reply(request, {"error": f"FakeHub does not implement {method} {path}"}, status=404)

    def _commit(self, request: BaseHTTPRequestHandler, repo_id: str, revision: str, body: bytes) -> None:
        repo = self.repos[repo_id]
        commit: dict[str, Any] = {"revision": revision, "files": {}, "lfs": set()}
        for line in body.splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                commit["summary"] = value["summary"]
            elif item["key"] == "file":
                commit["files"][value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                if value["oid"] not in self.lfs_objects:
                    return self._reply(request, {"error": f"LFS object {value['oid']} was never uploaded"}, status=400)
                commit["files"][value["path"]] = self.lfs_objects[value["oid"]]
                commit["lfs"].add(value["path"])
        repo.commits.append(commit)
        repo.files.update(commit["files"])
        oid = hashlib.sha1(repr(sorted(repo.files.items())).encode()).hexdigest()
        self._reply(request, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid})

    def _validate_yaml(self, request: BaseHTTPRequestHandler, content: str) -> None:
        """The Hub checks a README's metadata block before accepting the commit; so does the stand-in."""
        import yaml

        head, _, rest = content.partition("\n---\n")
        metadata = yaml.safe_load(head.removeprefix("---\n")) if content.startswith("---\n") and rest else None
        if not isinstance(metadata, dict):
            return self._reply(request, {"errors": [{"message": "no YAML metadata block"}]}, status=400)
        self.card_metadata.append(metadata)
        self._reply(request, {"errors": [], "warnings": []})

    @staticmethod
    def _reply(request: BaseHTTPRequestHandler, payload: dict[str, Any], status: int = 200) -> None:
        data = json.dumps(payload).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)


def git_blob_sha1(data: bytes) -> str:
    """The id git (and the Hub's ETag) gives a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def write_hub_cache(
    cache_dir: Path, repo_id: str, files: dict[str, bytes], commit: str, update_main: bool = True
) -> Path:
    """
    Stores `files` as revision `commit` of model repo `repo_id` in a Hub cache, as `hf_hub_download` would: blobs
    named by their ETag (sha256 for LFS files, git blob id otherwise), the snapshot as relative symlinks to them,
    and `refs/main` pointing at `commit` when `update_main`. Returns the snapshot folder.
    """
    repo_dir = cache_dir / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    for name, data in files.items():
        large = name.endswith((".safetensors", ".bin"))
        etag = hashlib.sha256(data).hexdigest() if large else git_blob_sha1(data)
        blob = repo_dir / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if update_main:
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative POSIX paths), skipping caches."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def run_offline_script(script: str, hub_cache: Path, workdir: Path) -> dict[str, Any]:
    """
    Runs `script` in a fresh interpreter that cannot import prism_hf from the checkout and reads the Hub only from
    `hub_cache` (offline); returns the JSON it printed after `REPORT `.
    """
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(hub_cache),
        "HF_MODULES_CACHE": str(workdir / "modules"),
        "PYTHONPATH": "",
    }
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=workdir, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(next(line for line in result.stdout.splitlines() if line.startswith("REPORT"))[7:])
