"""Speech server load: N concurrent clients x M requests each against `gpt-sovits-mlx serve` on this machine.

    python benchmarks/server_load.py --clients 8 --requests 3            # starts a server over tiny models
    python benchmarks/server_load.py --url http://127.0.0.1:8000 --clients 4 --requests 2

Each client posts `POST /v1/audio/speech` (pcm by default: the first body bytes are the first audio) one
request after another; the report has p50/p95 first-audio and total latency, errors and audio seconds, as
JSON. Bounded: loopback addresses only, at most 64 clients x 100 requests, a per-request timeout and an
overall deadline after which the run stops. The server answers one request at a time (its MLX owner
thread), so with N clients the latency includes the queue: p50 total grows about N-fold.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np
from harness import ROOT, add_json_arg, machine_info, support_on_path, write_report

MAX_CLIENTS, MAX_REQUESTS = 64, 100
TEXT = "你好，欢迎使用语音合成服务。今天天气很好。"


def loopback_url(url: str) -> urllib.parse.SplitResult:
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if parts.scheme != "http" or not ok:
        raise SystemExit(f"--url {url!r}: this load script only targets http:// on this machine (127.0.0.1, "
                         "localhost or [::1])")
    return parts


def one_request(host: str, port: int, body: bytes, headers: dict, timeout: float) -> dict:
    """Send one request and read the body as it streams: first-byte and total seconds, bytes, status."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", "/v1/audio/speech", body=body, headers=headers)
        reply = conn.getresponse()
        first, size = None, 0
        while True:
            part = reply.read1(65536)
            if not part:
                break
            first = first if first is not None else time.perf_counter() - t0
            size += len(part)
        result = {"status": reply.status, "first_s": first, "total_s": time.perf_counter() - t0, "bytes": size}
        if reply.status != 200:
            result["error"] = f"HTTP {reply.status}"
        return result
    except (OSError, http.client.HTTPException) as exc:
        return {"status": 0, "error": f"{type(exc).__name__}: {exc}", "total_s": time.perf_counter() - t0}
    finally:
        conn.close()


def run_load(url: str, clients: int, requests: int, fmt: str, text: str, timeout: float, deadline_s: float,
             api_key: str | None) -> dict:
    parts = loopback_url(url)
    body = json.dumps({"model": "tts-1", "input": text, "voice": "alloy", "response_format": fmt}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    results: list[dict] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + deadline_s

    def client() -> None:
        for _ in range(requests):
            if time.monotonic() > stop_at:
                return
            result = one_request(parts.hostname, parts.port or 80, body, headers, timeout)
            with lock:
                results.append(result)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, name=f"client-{i}") for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200]
    bytes_per_s = {"pcm": 2 * 24000, "wav": 2 * 32000}.get(fmt)

    def pct(values: list[float]) -> dict:
        if not values:
            return {}
        return {"p50": float(np.percentile(values, 50)), "p95": float(np.percentile(values, 95)),
                "max": float(max(values))}

    return {
        "url": url, "clients": clients, "requests_per_client": requests, "format": fmt, "text": text,
        "sent": len(results), "ok": len(ok), "errors": len(results) - len(ok),
        "error_samples": sorted({r["error"] for r in results if "error" in r})[:5],
        "first_audio_s": pct([r["first_s"] for r in ok if r["first_s"] is not None]),
        "total_s": pct([r["total_s"] for r in ok]),
        "audio_s": sum(r["bytes"] for r in ok) / bytes_per_s if bytes_per_s else None,
        "wall_s": wall, "stopped_by_deadline": len(results) < clients * requests,
    }


def start_tiny_server(tmp: Path, tokens: int) -> tuple[subprocess.Popen, str]:
    """`gpt-sovits-mlx serve` over tiny random-weight models on a free port; returns (process, url)."""
    support_on_path()
    from tiny_models import build_tiny_model_dir

    models = build_tiny_model_dir(tmp / "models")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PRIMESPEECH_MODEL_DIR": str(models), "MAX_NEW_TOKENS": str(tokens),
           "DORA_PRIMESPEECH_MLX_CACHE": str(tmp / "cache"), "GPT_SOVITS_VOICES_DIR": str(tmp / "voices"),
           "GPT_SOVITS_API_KEY": "", "LOG_LEVEL": "WARNING"}
    process = subprocess.Popen([sys.executable, "-m", "dora_primespeech_mlx.cli", "serve", "--port", str(port)],
                               env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return process, url
        except OSError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not become ready within 300 s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default=None, help="a running server on this machine (default: start one over tiny "
                                                "random-weight models)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=3, help="per client")
    ap.add_argument("--format", choices=["pcm", "wav", "flac", "mp3"], default="pcm")
    ap.add_argument("--text", default=TEXT)
    ap.add_argument("--tokens", type=int, default=30, help="MAX_NEW_TOKENS of the tiny server")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per request")
    ap.add_argument("--deadline", type=float, default=900, help="seconds for the whole run")
    add_json_arg(ap, "server_load")
    args = ap.parse_args(argv)
    if not (1 <= args.clients <= MAX_CLIENTS and 1 <= args.requests <= MAX_REQUESTS):
        ap.error(f"use 1-{MAX_CLIENTS} clients and 1-{MAX_REQUESTS} requests per client")
    process = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            url = args.url
            if url is None:
                process, url = start_tiny_server(Path(tmp), args.tokens)
            report = {**machine_info(), "server": f"tiny models, MAX_NEW_TOKENS={args.tokens}" if process
                      else args.url,
                      **run_load(url, args.clients, args.requests, args.format, args.text, args.timeout,
                                 args.deadline, os.environ.get("GPT_SOVITS_API_KEY"))}
        finally:
            if process is not None:
                process.terminate()
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
    print(json.dumps({k: report[k] for k in ("clients", "sent", "ok", "errors", "first_audio_s", "total_s",
                                             "audio_s", "wall_s")}, indent=1))
    write_report(report, args.json)
    return 0 if report["errors"] == 0 and not report["stopped_by_deadline"] else 1


if __name__ == "__main__":
    sys.exit(main())
