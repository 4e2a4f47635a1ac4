"""The web playground at `/`, in a real headless browser against the real server.

`gpt-sovits-mlx serve` runs in its own process over tiny random-weight models (tests/support/tiny_models.py,
MAX_NEW_TOKENS small); Debian's chromium (/usr/bin/chromium, driven through /usr/bin/chromedriver by
selenium: nothing is downloaded) opens the page, waits for the voices, speaks, stops a long request, shows
an API error, adds a voice through the form, and sends the API key from its settings field to a second
server that asks for one. The page's WAV is checked sample for sample against the `pcm` the server streams
for the same request and seed, so the browser's stream reassembly is tested, not just that something played.
About 20 s on 2 cores.

The browser is required: without it the test fails and says how to install it
(`apt-get install -y chromium chromium-driver`), unless DPM_SKIP_BROWSER=1 is set. With
DPM_KEEP_SCREENSHOT=1 the final screenshot is also copied to benchmarks/results/cpu-linux/playground.png.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import wave
from pathlib import Path

import numpy as np
import pytest

from dora_primespeech_mlx.constants import CACHE_ENV

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "support"))
import tiny_models  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT_KEPT = ROOT / "benchmarks" / "results" / "cpu-linux" / "playground.png"
PCM_RATE = 24000
MAX_NEW_TOKENS = 30
WAIT_S = 120  # one request on the tiny models takes seconds; CI's 2 shared cores may be busy
TEXT = "你好，世界。Hello there."


def _browser_or_fail() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if not missing:
        return
    message = (f"the playground test needs Debian's chromium and its driver ({', '.join(missing)} missing): "
               "install them with `apt-get install -y chromium chromium-driver` (.ci/run does)")
    if os.environ.get("DPM_SKIP_BROWSER") == "1":
        pytest.skip(message + "; skipped because DPM_SKIP_BROWSER=1")
    pytest.fail(message, pytrace=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _http(url: str, data: bytes | None = None, headers: dict | None = None, timeout: float = WAIT_S):
    """(status, body bytes) of one request; error statuses are returned, not raised."""
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@contextlib.contextmanager
def _serve(work: Path, model_dir: Path, ready: bool = True, **extra_env: str):
    """`gpt-sovits-mlx serve` over `model_dir` on a free localhost port; yields its base URL once /health
    answers 200 (`ready`) or answers at all."""
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PRIMESPEECH_MODEL_DIR=str(model_dir), MAX_NEW_TOKENS=str(MAX_NEW_TOKENS),
               GPT_SOVITS_VOICES_DIR=str(work / "user-voices"), XDG_CONFIG_HOME=str(work / "config"),
               **{CACHE_ENV: str(model_dir.parent / "cache")}, **extra_env)
    for name in ("VOICE_NAME", "GPT_SOVITS_API_KEY"):
        if name not in extra_env:
            env.pop(name, None)
    port = _free_port()
    log_path = work / "server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "dora_primespeech_mlx.cli", "serve", "--host", "127.0.0.1",
                                 "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + WAIT_S
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"the server exited with {proc.returncode}:\n{log_path.read_text()}")
                try:
                    if _http(base + "/health", timeout=5)[0] == 200 or not ready:
                        break
                except OSError:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    pytest.fail(f"the server was not ready in {WAIT_S} s:\n{log_path.read_text()}")
                time.sleep(0.3)
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def _chromium(profile: Path):
    """Debian's headless chromium through its own chromedriver (selenium downloads nothing)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--autoplay-policy=no-user-gesture-required", "--window-size=1100,1800",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    _browser_or_fail()
    return tiny_models.build_tiny_model_dir(tmp_path_factory.mktemp("playground-models") / "models")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_dir):
    """The real server without an API key; yields its base URL and folders."""
    work = tmp_path_factory.mktemp("playground")
    with _serve(work, tiny_dir) as base:
        yield {"url": base, "work": work, "voices_dir": work / "user-voices"}


@pytest.fixture(scope="module")
def browser(server):
    with _chromium(server["work"] / "chromium-profile") as driver:
        driver.get(server["url"] + "/")
        yield driver


def _wait(driver, condition, what: str, timeout: float = WAIT_S):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition, f"timed out waiting for {what}")


def _by_id(driver, element_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def _picker(driver) -> tuple[list[str], str]:
    """The voice picker's option values and the selected one."""
    return driver.execute_script(
        "const s = document.getElementById('voice'); return [[...s.options].map(o => o.value), s.value];")


def _speak(driver, text: str, seed: int | None = None) -> dict:
    """Type `text`, press Speak, wait for the request's history row to settle; return that row."""
    before = driver.execute_script("return document.querySelectorAll('#history tbody tr').length")
    box = _by_id(driver, "text")
    box.clear()
    box.send_keys(text)
    seed_box = _by_id(driver, "seed")
    seed_box.clear()
    if seed is not None:
        seed_box.send_keys(str(seed))
    _by_id(driver, "speak").click()
    _wait(driver, lambda d: d.execute_script(
        "const rows = document.querySelectorAll('#history tbody tr');"
        "return rows.length > arguments[0] && rows[0].dataset.state !== 'running';", before), "the request to end")
    cells = driver.execute_script(
        "const r = document.querySelector('#history tbody tr'); return [r.dataset.state, ...[...r.cells].map(c => c.textContent)];")
    state, number, voice, chars, first_ms, total_ms, seconds, result = cells
    return {"state": state, "number": number, "voice": voice, "chars": chars, "first_ms": first_ms,
            "total_ms": total_ms, "seconds": seconds, "result": result}


def _page_wav(driver) -> bytes:
    """The bytes behind the <audio> element's blob: URL (the WAV the page built)."""
    encoded = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(document.getElementById('player').src).then(r => r.arrayBuffer()).then(b => {"
        "  let s = ''; const u = new Uint8Array(b);"
        "  for (let i = 0; i < u.length; i += 8192) s += String.fromCharCode(...u.subarray(i, i + 8192));"
        "  done(btoa(s)); }).catch(e => done('error: ' + e));")
    assert not encoded.startswith("error:"), encoded
    return base64.b64decode(encoded)


def _clip_wav(path: Path, seconds: float = 4.0, rate: int = 32000) -> Path:
    """A voiced-sounding 4 s clip: a 140 Hz buzz with harmonics, syllable-like amplitude and a little noise."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(3)
    tone = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 6))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2
    signal = 0.25 * tone * envelope + 0.01 * rng.standard_normal(t.size)
    pcm = (np.clip(signal / np.abs(signal).max() * 0.8, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.tobytes())
    return path


def test_page_loads_with_the_servers_voices_and_nothing_from_elsewhere(server, browser):
    _wait(browser, lambda d: d.execute_script("return document.getElementById('voice').dataset.count"),
          "the voice list")
    status, body = _http(server["url"] + "/v1/audio/voices")
    assert status == 200
    listing = json.loads(body)
    values, selected = _picker(browser)
    assert values == [v["id"] for v in listing["voices"]]
    assert selected == listing["default"]
    assert "ready" in _by_id(browser, "health").text.lower()
    # every resource the page loaded came from the server itself (no CDN, no web font)
    urls = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls, "the page loaded no resource at all"
    assert all(u.startswith(server["url"] + "/") for u in urls), urls
    assert {"/static/app.js", "/static/style.css"} <= {u[len(server["url"]):] for u in urls}
    sample = browser.execute_script("return document.getElementById('text').value")
    assert sample and _by_id(browser, "text-count").text == f"{len(sample)} / 4096 characters"


def test_speak_streams_into_the_audio_element(server, browser):
    _wait(browser, lambda d: d.execute_script("return document.getElementById('voice').dataset.count"),
          "the voice list")
    # count what the page hands to Web Audio while the body streams
    browser.execute_script(
        "window.scheduledSamples = 0; window.scheduledPieces = 0;"
        "const start = AudioBufferSourceNode.prototype.start;"
        "AudioBufferSourceNode.prototype.start = function (...args) {"
        "  window.scheduledSamples += this.buffer.length; window.scheduledPieces += 1;"
        "  return start.apply(this, args); };")
    row = _speak(browser, TEXT, seed=7)
    assert row["state"] == "done", (row, _by_id(browser, "speak-error").text)
    assert row["chars"] == str(len(TEXT))
    first_ms, total_ms, seconds = float(row["first_ms"]), float(row["total_ms"]), float(row["seconds"])
    assert 0 < first_ms <= total_ms
    assert seconds > 0
    # the <audio> element got the WAV: the browser decoded it, and its length is what the row reports
    _wait(browser, lambda d: d.execute_script(
        "const a = document.getElementById('player'); return a.readyState >= 1 && a.duration > 0;"),
        "the audio element's metadata", timeout=30)
    duration = browser.execute_script("return document.getElementById('player').duration")
    assert duration == pytest.approx(seconds, abs=0.01)
    link = _by_id(browser, "download")
    assert link.is_displayed() and link.get_attribute("download").endswith(".wav")
    assert link.get_attribute("href") == browser.execute_script("return document.getElementById('player').src")

    # the page's WAV holds exactly the samples the server streams as `pcm` for the same request
    wav = _page_wav(browser)
    with wave.open(io.BytesIO(wav)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, PCM_RATE)
        page_pcm = w.readframes(w.getnframes())
    body = json.dumps({"model": "tts-1", "input": TEXT, "voice": _picker(browser)[1], "response_format": "pcm",
                       "speed": 1.0, "seed": 7}).encode()
    status, server_pcm = _http(server["url"] + "/v1/audio/speech", body, {"Content-Type": "application/json"})
    assert status == 200
    assert len(page_pcm) == len(server_pcm) == round(seconds * PCM_RATE) * 2
    assert page_pcm == server_pcm
    assert np.abs(np.frombuffer(page_pcm, "<i2")).max() > 0  # not silence
    # and every sample went through Web Audio while it arrived, on a running 24 kHz context
    played = browser.execute_script(
        "return [window.scheduledSamples, window.scheduledPieces, audioCtx.state, audioCtx.sampleRate,"
        " audioCtx.currentTime];")
    assert played[0] == len(page_pcm) // 2 and played[1] >= 1
    assert played[2] == "running" and played[3] == PCM_RATE and played[4] > 0


def test_api_errors_are_shown_readably(server, browser):
    _wait(browser, lambda d: d.execute_script("return document.getElementById('voice').dataset.count"),
          "the voice list")
    # a voice the server does not know (as if it was removed after the page loaded)
    browser.execute_script(
        "const s = document.getElementById('voice'); s.add(new Option('gone', 'no-such-voice')); s.value = 'no-such-voice';")
    row = _speak(browser, "Hello.")
    assert row["state"] == row["result"] == "error"
    error = _by_id(browser, "speak-error")
    assert error.is_displayed()
    assert "HTTP 404" in error.text and "no-such-voice" in error.text
    assert "{" not in error.text  # the message, not the JSON
    browser.execute_script("const s = document.getElementById('voice'); s.remove(s.selectedIndex); s.selectedIndex = 0;")


def test_stop_keeps_what_arrived(server, browser):
    _wait(browser, lambda d: d.execute_script("return document.getElementById('voice').dataset.count"),
          "the voice list")
    box = _by_id(browser, "text")
    box.clear()
    box.send_keys("你好，今天天气很好。" * 30)  # thirty sentences: seconds of work on the tiny models
    _by_id(browser, "speak").click()
    _wait(browser, lambda d: _by_id(d, "speak-status").text.startswith("Streaming"), "the first audio")
    _by_id(browser, "stop").click()
    _wait(browser, lambda d: d.execute_script(
        "return document.querySelector('#history tbody tr').dataset.state !== 'running'"), "the stop")
    state, seconds = browser.execute_script(
        "const r = document.querySelector('#history tbody tr'); return [r.dataset.state, r.cells[5].textContent];")
    assert state == "stopped"
    assert not _by_id(browser, "speak-error").is_displayed()
    # the audio that arrived before the stop is offered; the page is ready for the next request
    assert float(seconds) > 0
    _wait(browser, lambda d: d.execute_script(
        "const a = document.getElementById('player'); return a.readyState >= 1 && a.duration > 0;"),
        "the partial audio's metadata", timeout=30)
    assert browser.execute_script("return document.getElementById('player').duration") == \
        pytest.approx(float(seconds), abs=0.01)
    assert _by_id(browser, "stop").get_attribute("disabled") is not None
    assert _by_id(browser, "speak").get_attribute("disabled") is None
    # the stop reached the server: it counts a synthesis cancelled because the client went away
    deadline = time.monotonic() + 30
    while _cancelled_total(server["url"]) < 1:
        assert time.monotonic() < deadline, "the server never cancelled the stopped synthesis"
        time.sleep(0.2)


def _cancelled_total(base: str) -> float:
    status, body = _http(base + "/metrics")
    assert status == 200
    found = re.findall(r"^\w+_cancelled_total (\S+)$", body.decode(), re.MULTILINE)
    assert len(found) == 1, "no *_cancelled_total counter in /metrics"
    return float(found[0])


def test_add_a_voice_through_the_form(server, browser):
    _wait(browser, lambda d: d.execute_script("return document.getElementById('voice').dataset.count"),
          "the voice list")
    clip = _clip_wav(server["work"] / "clip.wav")
    name = "Playground_Test-1"
    _by_id(browser, "voice-name").send_keys(name)
    _by_id(browser, "voice-transcript").send_keys("今天天气很好，我们一起去公园散步吧。")
    from selenium.webdriver.support.ui import Select

    Select(_by_id(browser, "voice-language")).select_by_value("zh")
    _by_id(browser, "voice-audio").send_keys(str(clip))
    _by_id(browser, "add-voice").click()
    _wait(browser, lambda d: "added" in _by_id(d, "voice-status").text or _by_id(d, "voice-error").is_displayed(),
          "the upload to be answered")
    assert not _by_id(browser, "voice-error").is_displayed(), _by_id(browser, "voice-error").text
    values, selected = _picker(browser)
    assert name in values and selected == name
    status, body = _http(server["url"] + "/v1/audio/voices")
    assert status == 200
    assert name in [v["id"] for v in json.loads(body)["voices"]]
    assert any(server["voices_dir"].rglob("*")), "the voice was not stored in the user voices folder"

    # the new voice speaks
    row = _speak(browser, "你好。", seed=1)
    assert row["state"] == "done" and row["voice"] == name, (row, _by_id(browser, "speak-error").text)
    assert float(row["seconds"]) > 0

    # the same name again: the server's 409 is shown on the form
    _by_id(browser, "voice-name").send_keys(name)
    _by_id(browser, "voice-transcript").send_keys("你好。")
    _by_id(browser, "voice-audio").send_keys(str(clip))
    _by_id(browser, "add-voice").click()
    _wait(browser, lambda d: _by_id(d, "voice-error").is_displayed(), "the duplicate to be refused")
    assert "HTTP 409" in _by_id(browser, "voice-error").text

    shot = server["work"] / "playground.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 0
    if os.environ.get("DPM_KEEP_SCREENSHOT") == "1":
        SCREENSHOT_KEPT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT_KEPT)


def test_loading_state_then_api_key_from_the_settings_field(tmp_path, tiny_dir):
    """The page opened while the engine loads says so (GET /health's 503) and carries on once it is ready.
    With GPT_SOVITS_API_KEY set, the page shows the 401 until the key is entered; the key is kept."""
    key = "playground-test-key"
    with _chromium(tmp_path / "chromium-profile") as driver, \
            _serve(tmp_path / "keyed", tiny_dir, ready=False, GPT_SOVITS_API_KEY=key) as base:
        # record every text the health line shows, from the page's first script on
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": (
            "window.healthLog = []; document.addEventListener('DOMContentLoaded', () => {"
            "  const el = document.getElementById('health'); window.healthLog.push(el.textContent);"
            "  new MutationObserver(() => window.healthLog.push(el.textContent))"
            "    .observe(el, {childList: true, characterData: true, subtree: true}); });")})
        driver.get(base + "/")
        # the engine takes seconds to load the voice: the page's first look at /health came before this one
        assert _http(base + "/health")[0] == 503, "the server was ready before the page opened"
        _wait(driver, lambda d: _by_id(d, "health").text == "Server ready.", "the page to see the server ready")
        log = driver.execute_script("return window.healthLog")
        assert any("not ready" in line and "HTTP 503" in line for line in log), log
        assert _http(base + "/v1/audio/voices")[0] == 401
        _wait(driver, lambda d: _by_id(d, "speak-error").is_displayed(), "the missing key to be reported")
        assert "HTTP 401" in _by_id(driver, "speak-error").text
        assert _by_id(driver, "speak").get_attribute("disabled") is not None
        field = _by_id(driver, "api-key")
        field.send_keys(key)
        field.submit()
        _wait(driver, lambda d: d.execute_script("return document.getElementById('voice').dataset.count"),
              "the voice list with the key")
        assert not _by_id(driver, "speak-error").is_displayed()
        # kept in this browser: a reload lists the voices at once and can speak
        driver.refresh()
        _wait(driver, lambda d: d.execute_script("return document.getElementById('voice').dataset.count"),
              "the voice list after a reload")
        assert _by_id(driver, "api-key").get_attribute("value") == key
        row = _speak(driver, "Hello.", seed=2)
        assert row["state"] == "done", (row, _by_id(driver, "speak-error").text)
