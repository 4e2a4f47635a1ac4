"""The synthesis engine: text -> phones -> BERT features -> GPT semantic tokens -> SoVITS waveform.

    engine = Engine("~/.dora/models/primespeech")
    voice = engine.registry.get("Doubao")
    result = engine.synthesize("你好，世界。", voice)        # AudioResult: float32 32 kHz mono
    for chunk in engine.synthesize_stream(text, voice): ...   # one AudioChunk per sentence

Shared encoders (HuBERT, RoBERTa) load once per engine; each voice's GPT and SoVITS load once and
stay in a small LRU; a voice's prompt (codes, spectrogram, style vector, prompt phones and BERT
features) is prepared once (`prepare_voice`). `cancel()` from another thread stops a running
synthesis within one GPT step.

Threading rule: one thread owns all MLX work. The thread that constructs an `Engine` is its owner;
loading, voice preparation, warm-up and every synthesis must run there for the engine's whole life
(since MLX 0.31.2 GPU streams, compiled graphs and convolution plans belong to the thread that made
them, and work handed to another thread fails on a GPU while passing on the CPU). Every
MLX-evaluating method checks the calling thread and raises `WrongThreadError` otherwise; only
`cancel()` and the pure-Python `registry` may be used from any thread. Adapters that talk to the
outside on another thread (the Dora node, a server) build the engine on a dedicated owner thread and
hand it requests.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from .constants import MAX_DECODE_STEPS
from .options import (
    SAMPLE_RATE,
    AudioChunk,
    NothingToSpeak,
    SynthesisCancelled,
    SynthesisOptions,
    WrongThreadError,
    join_audio,
)
from .batch_synthesis import MAX_BATCH_ROWS, synthesize_batched
from .models.sovits_stream import default_first_chunk_codes
from .text.frontend import request_sentences, warm_up_frontend
from .voices import Voice, VoiceRegistry
from .weights import release_freed_memory

logger = logging.getLogger(__name__)

DEFAULT_FRAGMENT_INTERVAL = 0.07  # s of silence after each sentence (primespeech's batch default)
BERT_DIM = 1024


__all__ = ["Engine", "AudioResult", "VoicePrompt", "PhoneSentence", "SynthesisCancelled", "WrongThreadError",
           "NothingToSpeak", "length_guard", "describe_backend"]

MAX_PROMPTS = 16  # prepared voices kept (VOICE:CUSTOM makes a new one per reference clip)
# MEMORY_PRESET: "default" keeps RoBERTa's layers in MLX memory; "low" streams them from the memory-mapped
# weights file at each call (same features to the bit, pages shared between processes, slower BERT)
MEMORY_PRESETS = ("default", "low")

# a "typical sentence" for warm-up: about 30 Chinese characters (the node's pieces rarely exceed it)
TYPICAL_SENTENCE_PHONES = 64
WARM_UP_TEXT_ZH = "今天的天气很好，我们一起去公园散步吧。"
WARM_UP_TEXT_EN = "The weather is nice today, so let us take a walk in the park."


def describe_backend() -> str:
    """MLX version, backend and default device, for the start-up log ("mlx 0.32.4, cuda, Device(gpu, 0))."""
    if mx.metal.is_available():
        backend = "metal"
    elif mx.default_device().type == mx.DeviceType.gpu:
        backend = "cuda"
    else:
        backend = "cpu"
    return f"mlx {getattr(mx, '__version__', '?')}, backend {backend}, device {mx.default_device()}"


def owner_only(method):
    """Raise `WrongThreadError` when `method` is called off the engine's owner thread (cheap: one
    thread-id comparison)."""

    @functools.wraps(method)
    def checked(self, *args, **kwargs):
        self.check_thread(method.__name__)
        return method(self, *args, **kwargs)

    return checked


@dataclass(frozen=True)
class VoicePrompt:
    """A voice's precomputed state: everything about the reference that synthesis needs."""

    voice: Voice
    prompt_codes: np.ndarray  # (P,) int64 semantic codes of the reference clip
    refer_spec: np.ndarray  # (1025, F) float32 linear spectrogram of the reference clip
    style: np.ndarray  # (512,) float32 style vector `ge`
    prompt_phone_ids: np.ndarray  # (S_p,) int64 phones of the transcript
    prompt_bert: np.ndarray  # (1024, S_p) float32 BERT features of the transcript
    seconds: float  # time it took to prepare

    def gpt_inputs(self, sentence: PhoneSentence) -> tuple[np.ndarray, mx.array, np.ndarray]:
        """The GPT's `(phone_ids, bert, prompt_tokens)` for `sentence` in this voice (features joined on the device)."""
        return (np.concatenate([self.prompt_phone_ids, sentence.phone_ids]),
                mx.concatenate([mx.array(self.prompt_bert), mx.array(sentence.bert)], axis=1), self.prompt_codes)


@dataclass
class AudioResult:
    """A whole utterance: the joined chunks plus per-stage timings (seconds)."""

    audio: np.ndarray
    sample_rate: int
    timings: dict[str, float] = field(default_factory=dict)
    sentences: int = 0

    @property
    def duration(self) -> float:
        return float(len(self.audio)) / float(self.sample_rate)


@dataclass(frozen=True)
class PhoneSentence:
    """One sentence ready for the GPT: phone ids and their BERT features."""

    text: str
    phone_ids: np.ndarray  # (S,) int64
    bert: mx.array  # (1024, S) float32, lazy on the device; zeros for non-Chinese segments


def length_guard(n_phones: int, cap: int | None, tokens_per_phone: float) -> int:
    """Most semantic tokens a sentence may produce.

    Random or confused GPTs may never emit EOS; speech runs at about 2-4 tokens (25 Hz) per phone,
    so `tokens_per_phone` (default 10) times the phone count, at least 75 tokens (3 s), is generous
    for real speech and stops babbling long before upstream's 1500-token (60 s) cap.
    """
    guard = max(75, int(np.ceil(tokens_per_phone * n_phones)))
    return min(cap or MAX_DECODE_STEPS, guard, MAX_DECODE_STEPS)


class Engine:
    """GPT-SoVITS v2 synthesis over a PrimeSpeech model directory."""

    def __init__(self, model_dir: str | Path | None = None, *, use_ane: bool = False,
                 registry: VoiceRegistry | None = None, max_loaded_voices: int = 3,
                 tokens_per_phone: float = 10.0, precision: str = "fp32", batch_rows: int | None = None,
                 memory_preset: str | None = None):
        """`precision` "fp32" (default, the parity-tested path) or, opt-in, "fp16"/"bf16"/"int8": the
        GPT in that precision (`models.t2s_precision.apply_precision`) and RoBERTa in fp16; SoVITS and HuBERT
        stay fp32. At every precision HuBERT is unloaded once a voice's prompt codes are made. Bounds:
        tests/test_precision.py; figures: benchmarks/bench_precision.py, bench_debate_memory.py.

        `memory_preset` (default: $MEMORY_PRESET, else "default"): "low" keeps RoBERTa's weights in their
        memory-mapped file and streams a layer at a time per call (`models.bert.load_bert(streamed=True)`):
        bit-identical features, ~1.1 GB less per process at fp32, the file's pages shared between
        processes, each BERT call ~20 % slower on a CPU (docs/performance.md, the debate's memory)."""
        from .constants import PRECISIONS

        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.precision = precision
        if memory_preset is None:
            memory_preset = os.environ.get("MEMORY_PRESET", "").strip().lower() or "default"
        if memory_preset not in MEMORY_PRESETS:
            raise ValueError(f"memory_preset (MEMORY_PRESET) must be one of {', '.join(MEMORY_PRESETS)}, "
                             f"got {memory_preset!r}")
        self.memory_preset = memory_preset
        self.registry = registry or VoiceRegistry(model_dir)
        self.sample_rate = SAMPLE_RATE
        self.use_ane = use_ane
        self.tokens_per_phone = tokens_per_phone
        # whole-text mode decodes up to this many sentences together (batch_synthesis); 1: one by one.
        # Default: MAX_BATCH_ROWS on a GPU (launch-bound: 8 rows cost about one), 1 on the CPU, where
        # the step is compute-bound and rows measured ~5% slower per token than one by one
        if batch_rows is None:
            batch_rows = MAX_BATCH_ROWS if mx.default_device().type == mx.gpu else 1
        self.batch_rows = max(1, int(batch_rows))
        self.first_chunk_tokens = default_first_chunk_codes()  # streaming's first window (tokens)
        self._max_loaded = max(1, max_loaded_voices)
        self._models: OrderedDict[tuple[Path, Path], tuple[object, object]] = OrderedDict()
        self._prompts: OrderedDict[tuple, VoicePrompt] = OrderedDict()
        self._hubert = None
        self._bert = None
        self._coreml = None
        self._coreml_tried = False
        self._cancel = threading.Event()
        self._lock = threading.RLock()
        self._owner = threading.current_thread()  # the one thread that may run MLX work (module doc)
        self.backend = describe_backend()
        # Chinese polyphones: G2PW when $PRIMESPEECH_MODEL_DIR/G2PWModel/g2pW.onnx exists, else pypinyin
        from .text.g2pw import configure_g2pw

        configure_g2pw(self.registry.model_dir)

    # ------------------------------------------------------------------ threading

    @property
    def owner_thread(self) -> threading.Thread:
        return self._owner

    def check_thread(self, what: str = "this engine method") -> None:
        """Raise `WrongThreadError` unless called on the owner thread."""
        if threading.current_thread() is not self._owner:
            raise WrongThreadError(
                f"Engine.{what} called from thread {threading.current_thread().name!r}, but the engine belongs "
                f"to thread {self._owner.name!r}: run every MLX call on the thread that built the engine "
                "(MLX GPU streams and compiled graphs belong to their thread)")

    # ------------------------------------------------------------------ models

    @property
    def moyoyo(self) -> Path:
        return self.registry.moyoyo

    def _mlx_hubert(self):
        if self._hubert is None:
            from .models.hubert import load_hubert

            t0 = time.perf_counter()
            self._hubert = load_hubert(self._require(self.moyoyo / "chinese-hubert-base"))
            logger.info("HuBERT loaded in %.2f s", time.perf_counter() - t0)
        return self._hubert

    def _mlx_bert(self):
        if self._bert is None:
            from .models.bert import load_bert

            t0 = time.perf_counter()
            self._bert = load_bert(self._require(self.moyoyo / "chinese-roberta-wwm-ext-large"),
                                   dtype=mx.float32 if self.precision == "fp32" else mx.float16,
                                   streamed=self.memory_preset == "low")
            logger.info("RoBERTa loaded in %.2f s", time.perf_counter() - t0)
            release_freed_memory()
        return self._bert

    def _coreml_encoders(self):
        """Core ML encoders on the Neural Engine (USE_ANE=1 on macOS), else None: tried once."""
        if self.use_ane and not self._coreml_tried:
            from .coreml.runtime import load_coreml_encoders

            self._coreml_tried = True
            self._coreml = load_coreml_encoders(self.moyoyo, use_ane=True, hubert_fallback=self._mlx_hubert,
                                                bert_fallback=self._mlx_bert)
        return self._coreml

    @owner_only
    def hubert(self):
        """HuBERT: Core ML when enabled and available, else MLX (loaded once)."""
        coreml = self._coreml_encoders()
        return coreml.hubert if coreml is not None else self._mlx_hubert()

    @owner_only
    def bert(self):
        """RoBERTa: Core ML when enabled and available, else MLX (loaded once)."""
        coreml = self._coreml_encoders()
        return coreml.bert if coreml is not None else self._mlx_bert()

    @owner_only
    def voice_models(self, voice: Voice):
        """(T2S, SoVITS) of a voice, loaded once and kept in a small LRU."""
        key = (voice.gpt_weights, voice.sovits_weights)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            from .convert import load_sovits_cached, load_t2s_cached
            from .models.t2s_precision import apply_precision

            t0 = time.perf_counter()
            models = (apply_precision(load_t2s_cached(self._require(voice.gpt_weights)), self.precision),
                      load_sovits_cached(self._require(voice.sovits_weights)))
            logger.info("voice %r: GPT and SoVITS loaded in %.2f s", voice.id, time.perf_counter() - t0)
            self._models[key] = models
            while len(self._models) > self._max_loaded:
                self._models.popitem(last=False)
            return models

    @staticmethod
    def _require(path: Path) -> Path:
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: put the PrimeSpeech model files under "
                                    "$PRIMESPEECH_MODEL_DIR/moyoyo/ (see docs) or fix the voice's path")
        return path

    # ------------------------------------------------------------------ text

    @owner_only
    def phone_sentences(self, text: str, language: str, *, split: bool = True) -> list[PhoneSentence]:
        """Split `text` as dora-primespeech does (or not, for a prompt transcript) and turn each
        sentence into phone ids + BERT features (RoBERTa for Chinese spans, zeros otherwise)."""
        return list(self.iter_phone_sentences(text, language, split=split))

    def iter_phone_sentences(self, text: str, language: str, *, split: bool = True) -> Iterator[PhoneSentence]:
        """`phone_sentences`, lazily: each sentence's frontend and BERT run only when it is needed,
        so the first sentence's audio does not wait for the rest of a long text."""
        self.check_thread("iter_phone_sentences")
        for sentence in request_sentences(text, language, split=split):
            yield self._with_bert(sentence)

    def _with_bert(self, sentence) -> PhoneSentence:
        """Phone ids + BERT features (RoBERTa for Chinese spans, zeros otherwise) of one sentence."""
        feats = []
        for seg in sentence.segments:
            if seg.needs_bert and seg.word2ph:  # MLX's RoBERTa: lazy, on the device; Core ML's: numpy
                bert = self.bert()
                features = getattr(bert, "phone_features_array", bert.phone_features)
                feats.append(mx.array(features(seg.norm_text, seg.word2ph)))
            else:
                feats.append(mx.zeros((BERT_DIM, len(seg.phone_ids)), mx.float32))
        return PhoneSentence(sentence.text, np.asarray(sentence.phone_ids, np.int64), mx.concatenate(feats, axis=1))

    # ------------------------------------------------------------------ voices

    @owner_only
    def prepare_voice(self, voice: Voice) -> VoicePrompt:
        """Prompt codes, reference spectrogram, style vector, prompt phones and BERT: once per voice."""
        key = (voice.id, voice.reference_audio, voice.prompt_text, voice.prompt_lang, voice.sovits_weights)
        with self._lock:
            if key in self._prompts:
                self._prompts.move_to_end(key)
                return self._prompts[key]
        from .audio import reference_features

        t0 = time.perf_counter()
        _, sovits = self.voice_models(voice)
        codes, spec = reference_features(voice.reference_audio, self.hubert(), sovits)
        if self._hubert is not None:
            # HuBERT only makes prompt codes, once per voice (kept in the prompt LRU), so at every
            # precision its 0.38 GB go until another voice needs it (reloaded then, ~1 s on a CPU)
            self._hubert = None
            mx.clear_cache()
        style = sovits.style_vector(spec)
        prompt_text = voice.prompt_text.strip()
        if prompt_text and prompt_text[-1] not in "。.!?！？…":
            prompt_text += "。" if voice.prompt_lang != "en" else "."  # upstream ends the prompt with a stop
        sentences = self.phone_sentences(prompt_text, voice.prompt_lang, split=False)
        phone_ids = np.concatenate([s.phone_ids for s in sentences])
        bert = np.concatenate([np.array(s.bert) for s in sentences], axis=1)
        prompt = VoicePrompt(voice, np.asarray(codes, np.int64).reshape(-1), spec, style, phone_ids, bert,
                             time.perf_counter() - t0)
        logger.info("voice %r prepared in %.2f s (%d prompt codes, %d prompt phones)", voice.id, prompt.seconds,
                    prompt.prompt_codes.size, phone_ids.size)
        with self._lock:
            self._prompts[key] = prompt
            while len(self._prompts) > MAX_PROMPTS:
                self._prompts.popitem(last=False)
        mx.clear_cache()  # MLX's freed buffers (HuBERT's, the prompt's) first, so the trim returns them too
        release_freed_memory()  # what loading the models freed (their numpy sources) goes back to the OS
        return prompt

    @owner_only
    def warm_up(self, voice: Voice, options: SynthesisOptions | None = None, *, streaming: bool = False,
                first_chunk_tokens: int | None = None, chunk_tokens: int = 50,
                typical_phones: int = TYPICAL_SENTENCE_PHONES) -> dict[str, float]:
        """Pay one-off costs before the first request, for the settings requests will use.

        On a GPU: trace the compiled GPT step with `options`' sampling settings (top_k, top_p,
        temperature, repetition penalty) for every cache block up to the voice's prompt plus a typical
        sentence (`typical_phones`) and its length guard; with SoVITS shape buckets (CUDA), run every
        bucket a stream window at the voice's speed and a typical whole sentence need (speed < 1 needs
        longer windows than one 160-frame bucket), the window's bucket last; then one whole request of
        a typical sentence through the same path (`streaming`, `options`; measured on the H200: a
        2-token synthesis left the first real request ~1.3x slower than its repeat). On every device,
        the text frontends' lazy tables are loaded (for a voice whose transcript has no English, the
        first text with an English word paid 0.6 s on a 2-core CPU), except under `MEMORY_PRESET=low`
        (they hold ~160 MB). Returns seconds per part (0 for what there was nothing to warm: the GPT
        and SoVITS on the CPU)."""
        options = options or SynthesisOptions()
        first_chunk_tokens = first_chunk_tokens or self.first_chunk_tokens
        t2s, sovits = self.voice_models(voice)
        spent = {"frontend_s": 0.0, "t2s_s": 0.0, "sovits_s": 0.0, "synthesis_s": 0.0}
        if self.memory_preset != "low":
            t0 = time.perf_counter()
            warm_up_frontend()
            spent["frontend_s"] = time.perf_counter() - t0
        if not getattr(t2s, "compile_decode", False) and not getattr(sovits, "bucket_frames", 0):
            return spent
        prompt = self.prepare_voice(voice)
        speed = options.speed if options.speed is not None else voice.speed_factor
        tokens = length_guard(typical_phones, options.max_new_tokens, self.tokens_per_phone)
        if t2s.compile_decode:
            from .models.t2s_generate import COMPILE_BLOCK

            positions = prompt.prompt_phone_ids.size + prompt.prompt_codes.size + typical_phones + tokens
            capacity = -(-(positions + 1) // COMPILE_BLOCK) * COMPILE_BLOCK  # every block such a sentence reaches
            spent["t2s_s"] = t2s.warm_up_compiled(
                capacity,
                top_k=options.top_k, top_p=options.top_p, temperature=options.temperature,
                repetition_penalty=options.repetition_penalty)
            if self.batch_rows > 1:  # whole texts and a server's requests decode as rows (batch_synthesis)
                from .models.t2s_batch import BatchDecoder, RowSampling

                spent["t2s_s"] += BatchDecoder(t2s).warm_up_compiled(
                    self.batch_rows, capacity,
                    RowSampling(options.top_k, options.top_p, options.temperature, options.repetition_penalty))
        if sovits.bucket_frames:
            from .models.sovits_stream import max_window_frames

            whole_frames = int(2 * tokens / speed) + 1
            window_frames = max_window_frames(first_chunk_tokens, chunk_tokens, speed)
            spent["sovits_s"] = sovits.warm_up_buckets(max(whole_frames, window_frames), last=window_frames)
        t0 = time.perf_counter()
        # a whole typical request, as long as the node's cap allows: BERT and the prefill at a real
        # length, the decode across cache blocks (buffer growth included), SoVITS on a real sentence
        text = WARM_UP_TEXT_EN if voice.text_lang == "en" else WARM_UP_TEXT_ZH
        for _ in self.synthesize_stream(text, voice, replace(options, fragment_interval=0.0), streaming=streaming,
                                        first_chunk_tokens=first_chunk_tokens, chunk_tokens=chunk_tokens):
            pass
        spent["synthesis_s"] = time.perf_counter() - t0
        logger.info("warm-up: GPT %.2f s, SoVITS buckets %.2f s, first synthesis %.2f s", spent["t2s_s"],
                    spent["sovits_s"], spent["synthesis_s"])
        return spent

    # ------------------------------------------------------------------ synthesis

    def cancel(self) -> None:
        """Stop the running synthesis (from any thread) within one GPT step."""
        self._cancel.set()

    def synthesize_stream(self, text: str, voice: Voice | str, options: SynthesisOptions | None = None, *,
                          streaming: bool = True, first_chunk_tokens: int | None = None, chunk_tokens: int = 50,
                          on_token: Callable[[int], None] | None = None,
                          is_cancelled: Callable[[], bool] | None = None) -> Iterator[AudioChunk]:
        """Yield the utterance as `AudioChunk`s, sentence by sentence, the very last with `is_final`.

        With `streaming` (default) audio starts while the GPT is still generating: SoVITS decodes
        windows of semantic tokens (the first after `first_chunk_tokens`, None: the engine's
        `first_chunk_tokens`, 15 on a CUDA GPU and 25 elsewhere; then every `chunk_tokens`)
        with overlap and cross-fade (models/sovits_stream.py); the joined chunks differ from the
        whole-sentence decode only where a window had not yet seen later tokens. Without it, one
        chunk per sentence from a whole-sentence decode (what `synthesize` joins). Each sentence's
        last chunk carries its `fragment_interval` of silence. Timings are seconds; `elapsed_s` is the
        time from the call to that chunk (first-audio latency for the first one); MLX's BERT is lazy
        (evaluated with the GPT's prefill): its time counts in `t2s_s`.

        Cancellation raises `SynthesisCancelled` within one GPT step (or one SoVITS window): after
        `cancel()` from any thread, or once `is_cancelled()` (the caller's own flag, which also
        covers a cancel that came before this call started) returns True.
        """
        self.check_thread("synthesize_stream")
        self._cancel.clear()

        def cancelled() -> bool:
            return self._cancel.is_set() or (is_cancelled is not None and is_cancelled())

        t_start = time.perf_counter()
        options = options or SynthesisOptions()
        first_chunk_tokens = first_chunk_tokens or self.first_chunk_tokens
        voice = self.registry.get(voice) if isinstance(voice, str) else voice
        language = options.text_lang or voice.text_lang
        speed = options.speed if options.speed is not None else voice.speed_factor
        interval = DEFAULT_FRAGMENT_INTERVAL if options.fragment_interval is None else options.fragment_interval
        try:
            prompt = self.prepare_voice(voice)
            if cancelled():
                raise SynthesisCancelled()
            t2s, sovits = self.voice_models(voice)
            notes: list[str] = []
            texts = request_sentences(text, language, notes=notes)

            def next_sentence() -> PhoneSentence | None:
                for sentence in texts:
                    try:
                        return self._with_bert(sentence)
                    except Exception as exc:  # noqa: BLE001 - skip the sentence, speak the rest
                        notes.append(f"skipped {sentence.text[:40]!r}: {type(exc).__name__}: {str(exc)[:200]}")
                        logger.warning("skipped sentence %r: %s", sentence.text[:40], exc)
                return None

            t0 = time.perf_counter()
            upcoming = next_sentence()
            frontend_s = time.perf_counter() - t0
            if upcoming is None:
                reason = "; ".join(notes) or "no phones after normalisation"
                raise NothingToSpeak(f"text {text[:60]!r} has nothing to speak ({reason[:400]})", notes)
            if not streaming and self.batch_rows > 1:
                sentences = [upcoming]
                while (more := next_sentence()) is not None:  # the whole text's frontend + BERT first
                    if cancelled():
                        raise SynthesisCancelled()
                    sentences.append(more)
                frontend_s = time.perf_counter() - t0
                if len(sentences) > 1:
                    caps = [length_guard(s.phone_ids.size, options.max_new_tokens, self.tokens_per_phone)
                            for s in sentences]
                    yield from synthesize_batched(self, sentences, caps, prompt, t2s, sovits, options, speed=speed,
                                                  interval=interval, cancelled=cancelled, t_start=t_start,
                                                  frontend_s=frontend_s, notes=notes, max_rows=self.batch_rows)
                    return
            index = -1
            while upcoming is not None:
                index += 1
                sentence = upcoming
                seed = None if options.seed is None else options.seed + index
                decoder = None
                if streaming:
                    from .models.sovits_stream import SoVITSStreamDecoder

                    decoder = SoVITSStreamDecoder(sovits, sentence.phone_ids, ge=prompt.style, speed=speed,
                                                  noise_scale=options.noise_scale, seed=seed,
                                                  first_chunk_codes=first_chunk_tokens, chunk_codes=chunk_tokens)
                timings = {"frontend_s": frontend_s if index == 0 else 0.0, "t2s_s": 0.0, "sovits_s": 0.0}
                chunk_index = 0
                tokens: list[int] = []
                t1 = time.perf_counter()
                for token in t2s.generate_stream(
                        *prompt.gpt_inputs(sentence),
                        top_k=options.top_k, top_p=options.top_p, temperature=options.temperature,
                        repetition_penalty=options.repetition_penalty, seed=seed,
                        max_new_tokens=length_guard(sentence.phone_ids.size, options.max_new_tokens,
                                                    self.tokens_per_phone)):
                    if cancelled():
                        raise SynthesisCancelled()
                    tokens.append(token)
                    if on_token is not None:
                        on_token(token)
                    if decoder is not None:
                        t2 = time.perf_counter()
                        audio = decoder.feed(token)
                        timings["sovits_s"] += time.perf_counter() - t2
                        if audio.size:
                            timings["t2s_s"] = time.perf_counter() - t1 - timings["sovits_s"]
                            yield self._chunk(audio, index, chunk_index, False, timings, t_start, notes)
                            chunk_index += 1
                            timings = {"t2s_s": 0.0, "sovits_s": 0.0}
                            t1 = time.perf_counter()
                timings["t2s_s"] = time.perf_counter() - t1 - timings["sovits_s"]
                timings["tokens"] = float(len(tokens))
                if cancelled():
                    raise SynthesisCancelled()
                t2 = time.perf_counter()
                if not tokens:  # upstream decodes a single 0 code when the GPT stops at once
                    tokens = [0]
                    if decoder is not None:
                        decoder.feed(0)
                if decoder is not None:
                    audio = decoder.finish()
                else:
                    audio = sovits.decode(np.asarray(tokens, np.int64), sentence.phone_ids, ge=prompt.style,
                                          speed=speed, noise_scale=options.noise_scale, seed=seed)
                timings["sovits_s"] += time.perf_counter() - t2
                if cancelled():  # between stages too: a sentence's decode or BERT can take seconds on a CPU
                    raise SynthesisCancelled()
                t3 = time.perf_counter()
                # the next sentence's frontend + BERT: is this one the last?
                # (measured: running it on a worker thread during the GPT decode made things slower,
                # the decode loop is Python-bound and the threads share the GIL; docs/benchmarks.md)
                upcoming = next_sentence()
                if cancelled():
                    raise SynthesisCancelled()
                timings["frontend_next_s"] = time.perf_counter() - t3
                silence = np.zeros(int(round(interval * self.sample_rate)), np.float32)
                yield self._chunk(np.concatenate([audio.astype(np.float32), silence]), index, chunk_index,
                                  upcoming is None, timings, t_start, notes)
        finally:
            mx.clear_cache()  # release buffers between requests
            release_freed_memory()  # and the heap a request freed but glibc kept (~55 MB per node, ~2 ms)

    def _chunk(self, audio: np.ndarray, sentence: int, chunk: int, final: bool, timings: dict,
               t_start: float, notes: list[str] | None = None) -> AudioChunk:
        if not np.isfinite(audio).all():
            raise FloatingPointError(
                f"SoVITS produced non-finite audio for sentence {sentence} (NaN/Inf in the waveform): the voice's "
                "weights or reference clip are broken, or NOISE_SCALE/SPEED_FACTOR are out of range")
        peak = float(np.abs(audio).max(initial=0.0))
        if peak > 1.0:  # upstream peak-limits each sentence to 1; a stream can only limit each chunk
            audio = audio / peak
        timings = dict(timings, elapsed_s=time.perf_counter() - t_start, peak_memory_mb=mx.get_peak_memory() / 1e6)
        pending = tuple(notes or ())
        if notes:
            notes.clear()  # each note goes out once, with the next chunk
        return AudioChunk(audio.astype(np.float32, copy=False), self.sample_rate, sentence_index=sentence,
                          chunk_index=chunk, is_final=final, timings=timings, notes=pending)

    @owner_only
    def synthesize(self, text: str, voice: Voice | str, options: SynthesisOptions | None = None) -> AudioResult:
        """The whole utterance as one float32 array, plus summed per-stage timings."""
        t0 = time.perf_counter()
        chunks = list(self.synthesize_stream(text, voice, options, streaming=False))
        timings: dict[str, float] = {}
        for chunk in chunks:
            for k, v in chunk.timings.items():
                if k in ("elapsed_s", "peak_memory_mb"):
                    timings[k] = max(timings.get(k, 0.0), v)
                else:
                    timings[k] = timings.get(k, 0.0) + v
        timings["total_s"] = time.perf_counter() - t0
        result = AudioResult(join_audio(chunks), self.sample_rate, timings, sentences=len(chunks))
        if result.duration > 0:
            timings["rtf"] = timings["total_s"] / result.duration
        return result
