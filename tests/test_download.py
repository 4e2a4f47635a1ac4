"""`gpt-sovits-mlx download` against a local fake of the Hugging Face Hub (no network).

The fake answers the endpoints huggingface_hub calls, as the Hub does: `GET /api/models/<repo>/revision/<rev>`
(the commit), `POST /api/models/<repo>/paths-info/<rev>` (sizes, git blob ids, LFS sha256), and `HEAD`/`GET
/<repo>/resolve/<rev>/<path>` with `X-Repo-Commit` and `ETag`; an LFS file answers 302 to a CDN on another
origin with `X-Linked-Etag`/`X-Linked-Size`, and the CDN honours `Range` (206, `Content-Range`). Errors carry
the Hub's `X-Error-Code`. The CLI runs in a subprocess with `HF_ENDPOINT` pointing at the fake (the client reads
it at import) and its caches in tmp.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

from dora_primespeech_mlx import download

pytest.importorskip("huggingface_hub")  # a dependency of tokenizers, and in the [test] extra
pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parents[1]
VOICE_REPO, VOICE_ENTRIES = download.builtin_table()
G2PW_REPO = download.G2PW_REPO
LFS_SUFFIXES = (".ckpt", ".pth", ".bin", ".wav", ".onnx")  # what .gitattributes sends to LFS in these repos
BIG = "GPT_weights/doubao-mixed.ckpt"  # large enough to be cut and resumed
BIG_SIZE = 16 * 2**20  # the client writes in 10 MiB chunks and resumes from the last whole one
CUT_AT = 12 * 2**20


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """Two repositories at one commit each; knobs to corrupt, fail or cut a file; a log of requests."""

    def __init__(self):
        rng = random.Random(21)
        voice_paths = [e[k] for e in VOICE_ENTRIES for k in ("gpt_weights", "sovits_weights", "reference_audio")]
        self.repos: dict[str, dict] = {
            VOICE_REPO: {"commit": f"{rng.getrandbits(160):040x}",
                         "files": {p: self._content(rng, p) for p in [*voice_paths, *download.ENCODER_FILES,
                                                                      "README.md", ".gitattributes"]}},
            G2PW_REPO: {"commit": f"{rng.getrandbits(160):040x}",
                        "files": {p: self._content(rng, p) for p in [*download.G2PW_FILES, "version"]}},
        }
        self.by_sha = {hashlib.sha256(data).hexdigest(): (repo, path)
                       for repo, r in self.repos.items() for path, data in r["files"].items()}
        self.corrupt: set[str] = set()  # paths whose CDN bytes are wrong (same length)
        self.fail: set[str] = set()  # paths whose CDN answers 503
        self.cut_once: set[str] = set()  # paths whose next CDN GET stops at CUT_AT
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.lock = threading.Lock()
        self.hub = self._serve(HubHandler)
        self.cdn = self._serve(CdnHandler)
        self.endpoint = f"http://127.0.0.1:{self.hub.server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{self.cdn.server_address[1]}"

    @staticmethod
    def _content(rng: random.Random, path: str) -> bytes:
        size = BIG_SIZE if path == BIG else rng.randrange(2_000, 40_000)
        if path.endswith((".json", ".txt", ".py", ".md")) or "." not in path.rsplit("/", 1)[-1]:
            return ("".join(rng.choice("abcdefgh 一二三\n") for _ in range(size // 3))).encode()
        return rng.randbytes(size)

    def _serve(self, handler) -> ThreadingHTTPServer:
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        server.fake = self
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    def close(self):
        for server in (self.hub, self.cdn):
            server.shutdown()
            server.server_close()

    def is_lfs(self, path: str) -> bool:
        return path.endswith(LFS_SUFFIXES)

    def file_info(self, repo: str, path: str) -> dict:
        data = self.repos[repo]["files"][path]
        info = {"type": "file", "path": path, "size": len(data), "oid": _git_oid(data)}
        if self.is_lfs(path):
            sha = hashlib.sha256(data).hexdigest()
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()
            info.update(oid=_git_oid(pointer), lfs={"oid": sha, "size": len(data), "pointerSize": len(pointer)})
        return info

    def fetched(self) -> list[str]:
        """Files whose bytes were requested (resolve GETs of small files, CDN GETs of LFS files)."""
        names = []
        for method, path, _ in self.log:
            if method == "GET" and "/resolve/" in path:
                names.append(path.split("/resolve/", 1)[1].split("/", 1)[1])
            elif method == "GET" and path.startswith("/lfs/"):
                names.append(self.by_sha[path.split("/")[2]][1])
        return names


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest's output clean
        pass

    @property
    def fake(self) -> FakeHub:
        return self.server.fake

    def _record(self):
        with self.fake.lock:
            self.fake.log.append((self.command, unquote(urlsplit(self.path).path), self.headers.get("Range")))

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, *, head: bool = False):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str, head: bool = False, extra: dict | None = None):
        body = json.dumps({"error": message}).encode()
        self._send(status, body, {"Content-Type": "application/json", "X-Error-Code": code,
                                  "X-Error-Message": message, **(extra or {})}, head=head)

    def _body(self, data: bytes, headers: dict, head: bool):
        """`data`, or the part a `Range: bytes=N-` asks for (206)."""
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "") or "")
        if m and not head:
            start = int(m.group(1))
            headers = {**headers, "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
            self._send(206, data[start:], headers)
        else:
            self._send(200, data, headers, head=head)


class HubHandler(_Handler):
    def _repo(self, ns: str, name: str, rev: str, head: bool = False) -> dict | None:
        repo = self.fake.repos.get(f"{ns}/{name}")
        if repo is None:
            self._error(401, "RepoNotFound", "Repository not found", head)
        elif rev not in ("main", repo["commit"]):
            self._error(404, "RevisionNotFound", "Invalid rev id: " + rev, head)
        else:
            return repo
        return None

    def do_GET(self, head: bool = False):
        self._record()
        path = unquote(urlsplit(self.path).path)
        if m := re.fullmatch(r"/api/models/([^/]+)/([^/]+)/revision/(.+)", path):
            repo = self._repo(*m.groups())
            if repo is not None:
                body = {"_id": "0" * 24, "id": f"{m[1]}/{m[2]}", "modelId": f"{m[1]}/{m[2]}", "sha": repo["commit"],
                        "private": False, "disabled": False, "tags": [],
                        "siblings": [{"rfilename": p} for p in repo["files"]]}
                self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})
        elif m := re.fullmatch(r"/([^/]+)/([^/]+)/resolve/([^/]+)/(.+)", path):
            repo = self._repo(m[1], m[2], m[3], head)
            if repo is None:
                return
            repo_id, file = f"{m[1]}/{m[2]}", m[4]
            commit = {"X-Repo-Commit": repo["commit"]}
            if file not in repo["files"]:
                self._error(404, "EntryNotFound", "Entry not found", head, commit)
                return
            info = self.fake.file_info(repo_id, file)
            if "lfs" in info:  # as the Hub: a redirect to the CDN, the file's metadata on the redirect itself
                sha = info["lfs"]["oid"]
                self._send(302, b"", {**commit, "ETag": f'"{info["oid"]}"', "X-Linked-Etag": f'"{sha}"',
                                      "X-Linked-Size": info["size"],
                                      "Location": f"{self.fake.cdn_url}/lfs/{sha}?name={quote(file)}"}, head=head)
            else:
                self._body(repo["files"][file], {**commit, "ETag": f'"{info["oid"]}"'}, head)
        else:
            self._error(404, "NotFound", f"no route {path}")

    def do_HEAD(self):
        self.do_GET(head=True)

    def do_POST(self):
        self._record()
        path = unquote(urlsplit(self.path).path)
        length = int(self.headers.get("Content-Length", 0))
        form = parse_qs(self.rfile.read(length).decode())
        m = re.fullmatch(r"/api/models/([^/]+)/([^/]+)/paths-info/(.+)", path)
        if not m:
            self._error(404, "NotFound", f"no route {path}")
            return
        repo = self._repo(*m.groups())
        if repo is not None:
            found = [self.fake.file_info(f"{m[1]}/{m[2]}", p) for p in form.get("paths", []) if p in repo["files"]]
            self._send(200, json.dumps(found).encode(), {"Content-Type": "application/json"})


class CdnHandler(_Handler):
    def do_GET(self, head: bool = False):
        self._record()
        sha = urlsplit(self.path).path.removeprefix("/lfs/")
        if sha not in self.fake.by_sha:
            self._send(404, b"NoSuchKey")
            return
        repo, file = self.fake.by_sha[sha]
        data = self.fake.repos[repo]["files"][file]
        if file in self.fake.fail:
            self._send(503, b"Service Unavailable")
            return
        if file in self.fake.corrupt:
            data = bytes(b ^ 0x5A for b in data)
        name = file.rsplit("/", 1)[-1]
        headers = {"ETag": f'"{hashlib.md5(data).hexdigest()}"', "Content-Type": "application/octet-stream",
                   "Content-Disposition": f"inline; filename*=UTF-8''{quote(name)}; filename=\"{name}\";"}
        if not head and file in self.fake.cut_once and not self.headers.get("Range"):
            self.fake.cut_once.discard(file)
            self.send_response(200)  # promise the whole file, send part of it, hang up
            for k, v in {**headers, "Content-Length": len(data)}.items():
                self.send_header(k, str(v))
            self.end_headers()
            self.wfile.write(data[:CUT_AT])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._body(data, headers, head)

    def do_HEAD(self):
        self.do_GET(head=True)


@pytest.fixture
def hub():
    fake = FakeHub()
    yield fake
    fake.close()


def _env(tmp_path: Path, endpoint: str, pythonpath: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("HF_") and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_IMPLICIT_TOKEN="1", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
               PYTHONPATH=os.pathsep.join(p for p in (pythonpath, str(ROOT)) if p))
    env.pop("PRIMESPEECH_MODEL_DIR", None)
    return env


def run_cli(tmp_path: Path, endpoint: str, *args: str, pythonpath: str | None = None):
    return subprocess.run([sys.executable, "-m", "dora_primespeech_mlx.cli", "download",
                           "--model-dir", str(tmp_path / "models"), *args],
                          env=_env(tmp_path, endpoint, pythonpath), capture_output=True, text=True, timeout=120, check=False)


def voice_files(*ids: str) -> list[str]:
    by_id = {e["id"]: e for e in VOICE_ENTRIES}
    return [by_id[v][k] for v in ids for k in ("gpt_weights", "sovits_weights", "reference_audio")]


def test_two_voices_land_in_the_model_layout_and_a_second_run_fetches_nothing(tmp_path, hub):
    hub.cut_once.add(BIG)
    r = run_cli(tmp_path, hub.endpoint, "--voices", "Doubao,maple")
    assert r.returncode == 0, r.stderr
    models = tmp_path / "models"
    voice_bytes = hub.repos[VOICE_REPO]["files"]
    for path in [*voice_files("Doubao", "Maple"), *download.ENCODER_FILES]:
        assert (models / "moyoyo" / path).read_bytes() == voice_bytes[path], path
    for path in download.G2PW_FILES:
        assert (models / "G2PWModel" / path).read_bytes() == hub.repos[G2PW_REPO]["files"][path], path
    # only what was asked for: no other voice, nothing the engine does not read
    assert not (models / "moyoyo" / voice_files("Luo Xiang")[0]).exists()
    assert not (models / "moyoyo" / "README.md").exists() and not (models / "G2PWModel" / "version").exists()
    # the cut transfer was resumed by a Range request (from the client's last whole chunk), not restarted
    big_sha = hashlib.sha256(voice_bytes[BIG]).hexdigest()
    ranges = [rng for method, path, rng in hub.log if method == "GET" and path == f"/lfs/{big_sha}"]
    assert len(ranges) == 2 and ranges[0] is None, ranges
    assert 0 < int(re.fullmatch(r"bytes=(\d+)-", ranges[1]).group(1)) <= CUT_AT, ranges
    assert sorted(set(hub.fetched())) == sorted({*voice_files("Doubao", "Maple"), *download.ENCODER_FILES,
                                                 *download.G2PW_FILES})

    hub.log.clear()
    r = run_cli(tmp_path, hub.endpoint, "--voices", "Doubao,Maple")
    assert r.returncode == 0, r.stderr
    assert hub.fetched() == []
    assert not any("/resolve/" in path for _, path, _ in hub.log)  # not even a HEAD: verified from the record
    assert "0 file(s) fetched" in r.stdout and r.stdout.count("present and verified") == 19


def test_a_corrupted_download_is_deleted_and_named_and_the_next_run_heals_it(tmp_path, hub):
    ref = voice_files("Doubao")[2]
    hub.corrupt.add(ref)
    r = run_cli(tmp_path, hub.endpoint, "--voices", "Doubao", "--no-g2pw")
    local = tmp_path / "models" / "moyoyo" / ref
    assert r.returncode == 1
    assert "checksum mismatch" in r.stderr and str(local) in r.stderr
    assert hashlib.sha256(hub.repos[VOICE_REPO]["files"][ref]).hexdigest() in r.stderr
    assert not local.exists()
    gpt = tmp_path / "models" / "moyoyo" / voice_files("Doubao")[0]
    assert gpt.read_bytes() == hub.repos[VOICE_REPO]["files"][voice_files("Doubao")[0]]

    hub.corrupt.clear()
    hub.log.clear()
    r = run_cli(tmp_path, hub.endpoint, "--voices", "Doubao", "--no-g2pw")
    assert r.returncode == 0, r.stderr
    assert hub.fetched() == [ref]
    assert local.read_bytes() == hub.repos[VOICE_REPO]["files"][ref]

    # damaged on disk later (same size, so only the hash can tell): replaced on the next run
    tok = tmp_path / "models" / "moyoyo" / "chinese-roberta-wwm-ext-large/tokenizer.json"
    tok.write_bytes(b"x" * tok.stat().st_size)
    hub.log.clear()
    r = run_cli(tmp_path, hub.endpoint, "--voices", "Doubao", "--no-g2pw")
    assert r.returncode == 0, r.stderr
    assert "replace" in r.stdout and hub.fetched() == ["chinese-roberta-wwm-ext-large/tokenizer.json"]
    assert tok.read_bytes() == hub.repos[VOICE_REPO]["files"]["chinese-roberta-wwm-ext-large/tokenizer.json"]


def test_unknown_voice_names_the_known_ones_and_touches_nothing(tmp_path, hub):
    r = run_cli(tmp_path, hub.endpoint, "--voices", "Doubao,Nobody")
    assert r.returncode == 1
    assert "'Nobody'" in r.stderr and "Doubao" in r.stderr and "Trump" in r.stderr
    assert hub.log == [] and not (tmp_path / "models").exists()


def test_network_failures_are_reported_and_the_rerun_continues(tmp_path, hub):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    r = run_cli(tmp_path, dead, "--voices", "Doubao")
    assert r.returncode == 1
    assert f"cannot read {VOICE_REPO}@main from {dead}" in r.stderr and "run the command again" in r.stderr

    sovits = voice_files("Doubao")[1]
    hub.fail.add(sovits)
    r = run_cli(tmp_path, hub.endpoint, "--voices", "Doubao", "--no-g2pw")
    assert r.returncode == 1
    assert f"downloading {sovits}" in r.stderr and "HTTP 503" in r.stderr
    moyoyo = tmp_path / "models" / "moyoyo"
    assert (moyoyo / voice_files("Doubao")[0]).is_file() and not (moyoyo / sovits).exists()

    hub.fail.clear()
    hub.log.clear()
    r = run_cli(tmp_path, hub.endpoint, "--voices", "Doubao", "--no-g2pw")
    assert r.returncode == 0, r.stderr
    assert voice_files("Doubao")[0] not in hub.fetched() and sovits in hub.fetched()
    assert (moyoyo / sovits).read_bytes() == hub.repos[VOICE_REPO]["files"][sovits]


def test_dry_run_lists_and_writes_nothing(tmp_path, hub):
    r = run_cli(tmp_path, hub.endpoint, "--voices", "Cove", "--no-encoders", "--dry-run")
    assert r.returncode == 0, r.stderr
    for path in [*voice_files("Cove"), *download.G2PW_FILES]:
        assert re.search(rf"fetch +{re.escape(path)} \(", r.stdout), path
    assert "chinese-hubert-base" not in r.stdout
    assert "dry run: 9 file(s)" in r.stdout
    assert hub.fetched() == [] and not (tmp_path / "models").exists()


def test_a_file_the_repository_lacks_is_named_and_the_rest_still_comes(tmp_path, hub):
    gone = voice_files("Doubao")[2]
    del hub.repos[VOICE_REPO]["files"][gone]
    r = run_cli(tmp_path, hub.endpoint, "--voices", "Doubao", "--no-encoders", "--no-g2pw")
    assert r.returncode == 1
    assert f"{VOICE_REPO} has no file {gone!r}" in r.stderr
    for path in voice_files("Doubao")[:2]:
        assert (tmp_path / "models" / "moyoyo" / path).read_bytes() == hub.repos[VOICE_REPO]["files"][path]


def test_unknown_revision_is_a_clear_error(tmp_path, hub):
    r = run_cli(tmp_path, hub.endpoint, "--voices", "Doubao", "--revision", "no-such-branch")
    assert r.returncode == 1
    assert "no-such-branch" in r.stderr and "--revision" in r.stderr


def test_without_huggingface_hub_the_message_names_the_extra(tmp_path, hub):
    shadow = tmp_path / "shadow" / "huggingface_hub"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named huggingface_hub')\n")
    r = run_cli(tmp_path, hub.endpoint, "--voices", "Doubao", pythonpath=str(shadow.parent))
    assert r.returncode == 1
    assert "dora-primespeech-mlx[download]" in r.stderr
    assert hub.log == []
