"use strict";
// The playground: plain JS served by the app itself; no build step and nothing loaded from elsewhere.
// Speech is asked for as `pcm` (16-bit little-endian mono at 24 kHz), played through Web Audio piece by
// piece while it streams, and kept so that a WAV file can be offered when the stream ends.

const PCM_RATE = 24000;
const MAX_CHARS = 4096;
const KEY_STORE = "primespeech-mlx.api-key";
const LEAD_S = 0.05; // how far ahead of "now" the first piece is scheduled

const $ = (id) => document.getElementById(id);

let audioCtx = null;
let current = null; // the request in flight: {controller, sources}
let requests = 0;
let lastUrl = null;

// ---- helpers -----------------------------------------------------------------------------------------

function headers(extra) {
  const h = new Headers(extra || {});
  const key = $("api-key").value.trim();
  if (key) h.set("Authorization", "Bearer " + key);
  return h;
}

// A readable line from the API's error body {"error": {"message", "type", "param", "code"}}.
async function errorText(resp) {
  let err = null;
  try {
    err = (await resp.json()).error;
  } catch (e) {
    err = null; // not JSON: fall back to the status line
  }
  const status = `HTTP ${resp.status}`;
  if (!err || !err.message) return `${status} ${resp.statusText}`.trim();
  const details = [err.code, err.param ? `field “${err.param}”` : null].filter(Boolean).join(", ");
  return `${err.message}${details ? ` (${details})` : ""} — ${status}`;
}

function showError(id, text) {
  const el = $(id);
  el.textContent = text || "";
  el.hidden = !text;
}

function setStatus(id, text) {
  $(id).textContent = text;
}

// ---- server state and voices -------------------------------------------------------------------------

async function waitUntilReady() {
  for (;;) {
    let why;
    try {
      const resp = await fetch("/health", { headers: headers() });
      if (resp.ok) {
        $("health").textContent = "Server ready.";
        $("health").className = "ready";
        return;
      }
      why = await errorText(resp);
    } catch (e) {
      why = e.message;
    }
    $("health").textContent = `Server not ready (${why}); trying again…`;
    $("health").className = "waiting";
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

// Fill the picker; select `wanted` if given, else keep the current choice, else the server's default.
async function loadVoices(wanted) {
  const resp = await fetch("/v1/audio/voices", { headers: headers() });
  if (!resp.ok) {
    showError("speak-error", "Could not list the voices: " + (await errorText(resp)));
    return false;
  }
  const data = await resp.json();
  const picker = $("voice");
  const keep = wanted || picker.value || data.default;
  picker.replaceChildren(
    ...data.voices.map((v) => {
      const label = [v.name || v.id, v.language, v.source].filter(Boolean).join(" · ");
      return new Option(label, v.id);
    }),
  );
  picker.value = keep;
  if (picker.value !== keep) picker.value = data.default;
  picker.dataset.count = String(data.voices.length);
  $("speak").disabled = data.voices.length === 0;
  return true;
}

// ---- PCM in, Web Audio out, WAV at the end -----------------------------------------------------------

function getAudioContext() {
  if (!audioCtx) {
    try {
      audioCtx = new AudioContext({ sampleRate: PCM_RATE });
    } catch (e) {
      audioCtx = new AudioContext(); // buffers stay at 24 kHz; Web Audio resamples them when played
    }
  }
  audioCtx.resume();
  return audioCtx;
}

// Returns a function that turns each network piece into whole 16-bit samples (a piece may end mid-sample).
function sampleReader() {
  let carry = null;
  return (bytes) => {
    if (carry) {
      const joined = new Uint8Array(carry.length + bytes.length);
      joined.set(carry);
      joined.set(bytes, carry.length);
      bytes = joined;
      carry = null;
    }
    const whole = bytes.length - (bytes.length % 2);
    if (whole < bytes.length) carry = bytes.slice(whole);
    const view = new DataView(bytes.buffer, bytes.byteOffset, whole);
    const samples = new Int16Array(whole / 2);
    for (let i = 0; i < samples.length; i++) samples[i] = view.getInt16(2 * i, true);
    return samples;
  };
}

// Queue samples right after what is already queued (or just ahead of now, after a gap).
function schedule(ctx, state, samples) {
  const buffer = ctx.createBuffer(1, samples.length, PCM_RATE);
  const channel = buffer.getChannelData(0);
  for (let i = 0; i < samples.length; i++) channel[i] = samples[i] / 32768;
  const source = ctx.createBufferSource();
  source.buffer = buffer;
  source.connect(ctx.destination);
  const at = Math.max(state.playAt, ctx.currentTime + LEAD_S);
  source.start(at);
  state.playAt = at + buffer.duration;
  state.sources.push(source);
  source.onended = () => {
    const i = state.sources.indexOf(source);
    if (i >= 0) state.sources.splice(i, 1);
  };
}

function wavBlob(pieces, rate) {
  const count = pieces.reduce((n, p) => n + p.length, 0);
  const view = new DataView(new ArrayBuffer(44 + 2 * count));
  const ascii = (at, s) => [...s].forEach((c, i) => view.setUint8(at + i, c.charCodeAt(0)));
  ascii(0, "RIFF");
  view.setUint32(4, 36 + 2 * count, true);
  ascii(8, "WAVE");
  ascii(12, "fmt ");
  view.setUint32(16, 16, true); // fmt chunk size
  view.setUint16(20, 1, true); // PCM
  view.setUint16(22, 1, true); // mono
  view.setUint32(24, rate, true);
  view.setUint32(28, rate * 2, true); // bytes per second
  view.setUint16(32, 2, true); // bytes per frame
  view.setUint16(34, 16, true); // bits per sample
  ascii(36, "data");
  view.setUint32(40, 2 * count, true);
  let at = 44;
  for (const piece of pieces) {
    for (const s of piece) {
      view.setInt16(at, s, true);
      at += 2;
    }
  }
  return new Blob([view.buffer], { type: "audio/wav" });
}

// ---- history -----------------------------------------------------------------------------------------

function addHistoryRow(number, voice, chars) {
  const row = $("history").tBodies[0].insertRow(0);
  for (const value of [number, voice, chars, "…", "…", "…", "running"]) row.insertCell().textContent = value;
  row.dataset.state = "running";
  return row;
}

function finishHistoryRow(row, firstMs, totalMs, seconds, result) {
  const cells = row.cells;
  cells[3].textContent = firstMs === null ? "–" : firstMs.toFixed(0);
  cells[4].textContent = totalMs.toFixed(0);
  cells[5].textContent = seconds.toFixed(2);
  cells[6].textContent = result;
  row.dataset.state = result; // done, stopped or error
}

// ---- speaking ----------------------------------------------------------------------------------------

function setBusy(busy) {
  $("speak").disabled = busy;
  $("stop").disabled = !busy;
}

async function speak(event) {
  event.preventDefault();
  if (current) return;
  const started = performance.now();
  const ctx = getAudioContext(); // made inside the click, so the browser lets it play
  showError("speak-error", "");
  const body = {
    model: "primespeech-mlx",
    input: $("text").value,
    voice: $("voice").value,
    response_format: "pcm",
    speed: Number($("speed").value),
  };
  const seed = $("seed").value.trim();
  if (seed !== "") body.seed = Number(seed);

  requests += 1;
  const row = addHistoryRow(requests, body.voice, [...body.input].length);
  const state = { controller: new AbortController(), sources: [], playAt: 0 };
  current = state;
  setBusy(true);
  setStatus("speak-status", "Waiting for the first audio…");

  const pieces = [];
  let samples = 0;
  let firstMs = null;
  let result = "done";
  try {
    const resp = await fetch("/v1/audio/speech", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify(body),
      signal: state.controller.signal,
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    const reader = resp.body.getReader();
    const toSamples = sampleReader();
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      if (!value || value.length === 0) continue;
      if (firstMs === null) firstMs = performance.now() - started;
      const piece = toSamples(value);
      if (piece.length === 0) continue;
      pieces.push(piece);
      samples += piece.length;
      schedule(ctx, state, piece);
      setStatus("speak-status", `Streaming: ${(samples / PCM_RATE).toFixed(2)} s of audio so far…`);
    }
    if (samples === 0) throw new Error("The server answered with no audio.");
  } catch (e) {
    if (e.name === "AbortError") {
      result = "stopped";
    } else {
      result = "error";
      showError("speak-error", e.message);
    }
  }
  const totalMs = performance.now() - started;
  const seconds = samples / PCM_RATE;
  finishHistoryRow(row, firstMs, totalMs, seconds, result);
  if (samples > 0) offerWav(pieces, requests);
  setStatus(
    "speak-status",
    result === "error" ? "Failed." : `${result === "done" ? "Done" : "Stopped"}: ${seconds.toFixed(2)} s of audio.`,
  );
  current = null;
  setBusy(false);
}

function offerWav(pieces, number) {
  if (lastUrl) URL.revokeObjectURL(lastUrl);
  lastUrl = URL.createObjectURL(wavBlob(pieces, PCM_RATE));
  $("player").src = lastUrl;
  const link = $("download");
  link.href = lastUrl;
  link.download = `speech-${number}.wav`;
  link.hidden = false;
}

function stop() {
  if (!current) return;
  current.controller.abort();
  for (const source of [...current.sources]) source.stop();
}

// ---- adding a voice ----------------------------------------------------------------------------------

async function addVoice(event) {
  event.preventDefault();
  const form = $("voice-form");
  showError("voice-error", "");
  setStatus("voice-status", "Uploading…");
  $("add-voice").disabled = true;
  try {
    const resp = await fetch("/v1/audio/voices", { method: "POST", headers: headers(), body: new FormData(form) });
    if (!resp.ok) throw new Error(await errorText(resp));
    const { id } = await resp.json();
    await loadVoices(id);
    setStatus("voice-status", `Voice “${id}” added and selected.`);
    form.reset();
  } catch (e) {
    setStatus("voice-status", "");
    showError("voice-error", e.message);
  } finally {
    $("add-voice").disabled = false;
  }
}

// ---- start -------------------------------------------------------------------------------------------

function countChars() {
  const n = [...$("text").value].length;
  $("text-count").textContent = `${n} / ${MAX_CHARS} characters`;
  $("text-count").className = n > MAX_CHARS ? "over" : "";
}

function showSpeed() {
  $("speed-value").textContent = `${Number($("speed").value).toFixed(2)}×`;
}

async function start() {
  $("api-key").value = localStorage.getItem(KEY_STORE) || "";
  $("api-key").addEventListener("change", () => {
    const key = $("api-key").value.trim();
    if (key) localStorage.setItem(KEY_STORE, key);
    else localStorage.removeItem(KEY_STORE);
    showError("speak-error", "");
    loadVoices();
  });
  $("settings-form").addEventListener("submit", (event) => {
    event.preventDefault();
    $("api-key").dispatchEvent(new Event("change"));
  });
  $("text").addEventListener("input", countChars);
  $("speed").addEventListener("input", showSpeed);
  $("speak-form").addEventListener("submit", speak);
  $("stop").addEventListener("click", stop);
  $("voice-form").addEventListener("submit", addVoice);
  countChars();
  showSpeed();
  $("speak").disabled = true;
  await waitUntilReady();
  await loadVoices();
}

start();
