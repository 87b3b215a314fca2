"""A loopback fake of the Hugging Face Hub API: just the endpoints ``huggingface_hub`` calls to push and pull.

Pushing: ``create_repo``, ``create_branch`` and ``create_commit`` (its README metadata check, ``preupload``
and the NDJSON ``commit``). Pulling (``snapshot_download``): ``repo_info``, the recursive tree listing and
``resolve`` (HEAD for metadata, GET for content). Commits update the branch they target, so what was pushed
can be downloaded. It records what it receives and can be told to fail.

Point an ``HfApi`` at it with ``endpoint=hub.url``: ``huggingface_hub`` copies ``HF_ENDPOINT`` into
``constants.ENDPOINT`` (and derives ``HUGGINGFACE_CO_URL_TEMPLATE`` from it) once, at import, so setting the
variable inside a test is too late. Downloads without an ``endpoint`` argument need both constants
patched, see :meth:`FakeHub.patch_endpoint`.

Upload modes: in huggingface_hub 2.x the *server* decides whether a file is a regular git blob or an LFS one
(the ``uploadMode`` of each file in the ``preupload`` answer; only empty files are forced to "regular" by
the client). The real Hub answers "lfs" for safetensors and large files, which the client then sends
through Xet storage when ``hf_xet`` is installed (it is a hard dependency), a native protocol that cannot be
faked on loopback. This fake answers "regular" for every file, so everything travels base64-encoded inside
the NDJSON commit body; the files of tiny test models are small enough for that to be realistic.

Usage::

    with FakeHub() as hub:
        push_to_hub(folder, "org/name", endpoint=hub.url, token="hf_test")
        hub.commits[0].files  # {path_in_repo: bytes}
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["Commit", "FakeHub", "Request"]

REPO = r"(?P<repo>[^/]+(?:/[^/]+)?)"
ROUTES = [
    ("POST", "create", re.compile(r"/api/repos/create")),
    ("POST", "validate-yaml", re.compile(r"/api/validate-yaml")),
    ("POST", "preupload", re.compile(rf"/api/models/{REPO}/preupload/(?P<rev>.+)")),
    ("POST", "commit", re.compile(rf"/api/models/{REPO}/commit/(?P<rev>.+)")),
    ("POST", "branch", re.compile(rf"/api/models/{REPO}/branch/(?P<rev>.+)")),
    ("GET", "repo_info", re.compile(rf"/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?")),
    ("GET", "tree", re.compile(rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)")),
    ("GET", "resolve", re.compile(rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)")),
    ("HEAD", "resolve", re.compile(rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)")),
]
EMPTY_SHA = "0" * 40


@dataclass
class Request:
    """One request as the fake saw it. ``authorization`` is kept in memory only, for assertions."""

    method: str
    route: str
    path: str
    authorization: str | None


@dataclass
class Commit:
    """One commit: its target, message, query flags and the files it carried."""

    repo_id: str
    revision: str
    summary: str
    create_pr: bool
    files: dict[str, bytes] = field(default_factory=dict)


class FakeHub:
    """A ``ThreadingHTTPServer`` on 127.0.0.1, port chosen by the OS, serving in a daemon thread."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.created: list[dict[str, Any]] = []  # create_repo payloads
        self.branches: list[tuple[str, str]] = []  # (repo_id, branch)
        self.commits: list[Commit] = []
        # (repo_id, branch or commit sha) -> (commit sha, {path: content})
        self.trees: dict[tuple[str, str], tuple[str, dict[str, bytes]]] = {}
        # route (or "*") -> [status, remaining count or None for always]
        self._failures: dict[str, list[Any]] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        # A short poll interval: shutdown() waits for the serving loop to notice, 0.5 s by default.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def fail(self, status: int, *, route: str = "*", times: int | None = None) -> None:
        """Answer ``status`` on ``route`` ("create", "commit", ...; "*" for all), ``times`` times or forever."""
        self._failures[route] = [status, times]

    def add_file(self, repo_id: str, path: str, data: bytes) -> None:
        """Put a file on ``main`` behind the client's back (e.g. a pickle some other tool uploaded)."""
        sha, files = self.trees[(repo_id, "main")]
        self._set_branch(
            repo_id, "main", hashlib.sha1(sha.encode() + data).hexdigest(), {**files, path: data}
        )

    def patch_endpoint(self, monkeypatch: Any) -> None:
        """Send every huggingface_hub call without an explicit endpoint here (pytest's ``monkeypatch``)."""
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "ENDPOINT", self.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", self.url + "/{repo_id}/resolve/{revision}/{filename}"
        )

    def _set_branch(self, repo_id: str, branch: str, sha: str, files: dict[str, bytes]) -> None:
        self.trees[(repo_id, branch)] = self.trees[(repo_id, sha)] = (sha, files)

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- request handling ---------------------------------------------------------------------------------

    def _take_failure(self, route: str) -> int | None:
        with self._lock:
            for key in (route, "*"):
                entry = self._failures.get(key)
                if entry is None:
                    continue
                status, remaining = entry
                if remaining is not None:
                    if remaining <= 0:
                        continue
                    entry[1] = remaining - 1
                return status
        return None

    def _answer(self, route: str, match: re.Match[str], query: dict[str, list[str]], body: bytes) -> Any:
        """``(status, JSON payload or raw bytes, extra headers)`` for one request."""
        repo_id = unquote(match.groupdict().get("repo") or "")
        rev = unquote(match.groupdict().get("rev") or "main")
        if route == "create":
            payload = json.loads(body)
            self.created.append(payload)
            full = "/".join(filter(None, (payload.get("organization"), payload["name"])))
            if (full, "main") in self.trees:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{full}"}, {}
            self._set_branch(full, "main", EMPTY_SHA, {})
            return 200, {"url": f"{self.url}/{full}", "name": full}, {}
        if route == "validate-yaml":
            return 200, {"errors": [], "warnings": []}, {}
        if (repo_id, "main") not in self.trees:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        if route == "branch":
            self.branches.append((repo_id, rev))
            self._set_branch(repo_id, rev, *self.trees[(repo_id, "main")])
            return 200, {}, {}
        if route == "preupload":
            files = [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                for f in json.loads(body)["files"]
            ]
            return 200, {"files": files}, {}
        if route == "commit":
            return 200, self._commit(repo_id, rev, query, body), {}
        if (repo_id, rev) not in self.trees:
            return 404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"}
        sha, files = self.trees[(repo_id, rev)]
        if route == "repo_info":
            siblings = [{"rfilename": path} for path in files]
            return 200, {"id": repo_id, "sha": sha, "private": True, "siblings": siblings}, {}
        if route == "tree":
            entries = [
                {"type": "file", "path": p, "size": len(d), "oid": _blob_id(d)} for p, d in files.items()
            ]
            return 200, entries, {}
        path = unquote(match["file"])
        if path not in files:
            return 404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha}
        return 200, files[path], {"X-Repo-Commit": sha, "ETag": f'"{_blob_id(files[path])}"'}

    def _commit(self, repo_id: str, rev: str, query: dict[str, list[str]], body: bytes) -> dict[str, Any]:
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        files = {}
        for item in lines:
            if item["key"] == "lfsFile":
                raise AssertionError("the fake hub never asks for LFS uploads")
            if item["key"] == "file":
                value = item["value"]
                assert value["encoding"] == "base64", value
                files[value["path"]] = base64.b64decode(value["content"])
        create_pr = query.get("create_pr") == ["1"]
        self.commits.append(Commit(repo_id, rev, header["summary"], create_pr, files))
        oid = hashlib.sha1(body).hexdigest()
        answer = {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid}
        if create_pr:  # a pull request leaves the branch as it is
            answer["pullRequestUrl"] = f"{self.url}/{repo_id}/discussions/{len(self.commits)}"
        else:
            self._set_branch(repo_id, rev, oid, {**self.trees[(repo_id, rev)][1], **files})
        return answer

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def _dispatch(self) -> None:
                parts = urlsplit(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                found = next(
                    (
                        (route, m)
                        for method, route, pattern in ROUTES
                        if method == self.command and (m := pattern.fullmatch(parts.path))
                    ),
                    None,
                )
                if found is None:
                    self._send(404, {"error": f"fake hub: no route for {self.command} {parts.path}"})
                    return
                route, match = found
                hub.requests.append(
                    Request(self.command, route, parts.path, self.headers.get("Authorization"))
                )
                status = hub._take_failure(route)
                if status is not None:
                    headers = (
                        {"X-Error-Message": "Invalid credentials in Authorization header"}
                        if status == 401
                        else {}
                    )
                    self._send(status, {"error": f"fake hub: injected {status}"}, headers)
                    return
                self._send(*hub._answer(route, match, parse_qs(parts.query), body))

            def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
                raw = isinstance(payload, bytes)
                data = payload if raw else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream" if raw else "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_HEAD = _dispatch

            def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
                pass

        return Handler


def _blob_id(data: bytes) -> str:
    """Git's blob id, which the Hub uses as the ETag of a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
