"""SoVITS v2 decoder stage (`module/models.py SynthesizerTrn`, inference parts), in MLX.

Semantic codes (25 Hz) + target phones + a reference spectrogram -> 32 kHz audio:

    ge     = ref_enc(spec[:704])                       style vector (512,)
    q      = codebook[codes], nearest-upsampled x2     50 Hz
    m, ls  = enc_p(q, phones, ge, speed)               text encoder with MRTE
    z      = flow^-1(m + noise * exp(ls) * noise_scale, ge)
    audio  = dec(z, ge)                                HiFi-GAN (models/hifigan.py)

Internally every tensor is channels-last `(B, T, C)` (MLX convolutions); the public API takes and
returns numpy arrays, channel-first and without batch, like upstream's tensors minus the batch axis.
The public API decodes one utterance at a time, so every sequence mask upstream applies is all ones
and is left out here.

This file holds the model graph, `sanitize`, the numpy API and loading; the config is in
sovits_config.py, the building blocks in sovits_layers.py, and streaming in sovits_stream.py
(which uses only this model's public pieces; nothing here imports it).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx import nn
from mlx.utils import tree_flatten

from ..weights import (
    CheckpointError,
    check_state_dict,
    fuse_weight_norm,
    normalize_weight_norm_names,
    plain_config,
    read_torch_file,
    short_repr,
)
from .base import load_strict
from .hifigan import Generator, frame_mask
from .sovits_config import V1_SYMBOLS, SoVITSConfig
from .sovits_layers import MelStyleEncoder, Quantizer, ResidualCouplingBlock, TextEncoder, frame_noise

logger = logging.getLogger(__name__)

__all__ = ["SoVITS", "SoVITSConfig", "frame_noise", "load_sovits", "save_sovits_safetensors", "spectrogram"]

# metadata tag of the converted cache (`save_sovits_safetensors`); bump it if the layout changes
SAFETENSORS_FORMAT = "dora-primespeech-mlx/sovits-v1"


# ------------------------------------------------------------------------------------------- model


def spectrogram(wav: np.ndarray, filter_length: int = 2048, hop_length: int = 640, win_length: int = 2048) -> np.ndarray:
    """Linear magnitude spectrogram as dora-primespeech computes it: `(filter_length//2+1, F)` float32.

    Reflect padding of (n_fft - hop)/2 on both sides, STFT without centering, periodic Hann window,
    magnitude `sqrt(re^2 + im^2 + 1e-6)`. Computed in float64 (torch works in float32; the
    float64 result is the closer of the two to the exact value).
    """
    wav = np.asarray(wav, dtype=np.float64).reshape(-1)
    pad = (filter_length - hop_length) // 2
    if wav.size <= pad:
        raise ValueError(f"waveform of {wav.size} samples is too short for a spectrogram (needs more than {pad})")
    y = np.pad(wav, (pad, pad), mode="reflect")
    n_frames = 1 + (y.size - filter_length) // hop_length
    window = np.zeros(filter_length)
    n = np.arange(win_length)
    off = (filter_length - win_length) // 2
    window[off : off + win_length] = 0.5 - 0.5 * np.cos(2 * np.pi * n / win_length)
    frames = np.lib.stride_tricks.sliding_window_view(y, filter_length)[::hop_length][:n_frames]
    spec = np.fft.rfft(frames * window, axis=-1)  # (F, n_fft//2+1)
    mag = np.sqrt(spec.real**2 + spec.imag**2 + 1e-6)
    return mag.T.astype(np.float32)


class SoVITS(nn.Module):
    """SynthesizerTrn (v2) minus the training-only posterior encoder and discriminator.

    `compile_vocoder=True` runs HiFi-GAN through `mx.compile` (one compiled graph per input length;
    same results bit for bit; see benchmarks/bench_sovits.py for when it pays). Off by default.
    """

    def __init__(self, config: SoVITSConfig, *, compile_vocoder: bool = False):
        super().__init__()
        self.config = config
        cfg = config
        if cfg.semantic_frame_rate not in ("25hz", "50hz"):
            raise ValueError(f"semantic_frame_rate must be '25hz' or '50hz', got {cfg.semantic_frame_rate!r}")
        self.ssl_proj = nn.Conv1d(cfg.ssl_dim, cfg.ssl_dim, 2 if cfg.semantic_frame_rate == "25hz" else 1,
                                  stride=2 if cfg.semantic_frame_rate == "25hz" else 1)
        self.quantizer = Quantizer(cfg.codebook_size, cfg.ssl_dim)
        self.enc_p = TextEncoder(cfg)
        self.flow = ResidualCouplingBlock(cfg.inter_channels, cfg.hidden_channels, 5, 4, 4, cfg.gin_channels)
        self.dec = Generator(cfg.inter_channels, cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes,
                             cfg.upsample_rates, cfg.upsample_initial_channel, cfg.upsample_kernel_sizes,
                             gin_channels=cfg.gin_channels)
        self.ref_enc = MelStyleEncoder(cfg.style_bins, 128, cfg.gin_channels)
        # a plain attribute (not a parameter): the compiled graph closes over the loaded weights
        self._vocoder = mx.compile(self.dec) if compile_vocoder else self.dec
        # > 0: the flow and HiFi-GAN run on inputs zero-padded up to a multiple of this many frames,
        # masked so real frames are unchanged: on MLX's CUDA backend a convolution shape other than
        # the previous call's costs ~100 ms (`default_bucket_frames`). Set by `load_sovits`.
        self.bucket_frames = 0

    # ---------------------------------------------------------------- weights

    def sanitize(self, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Checkpoint `weight` dict -> MLX parameters (float32). Pure and idempotent.

        Fuses weight norm (`g * v / ||v||`, norm over all axes but 0: per output channel of a
        Conv1d, per input channel of a ConvTranspose1d), drops `enc_q.*` and the quantizer's EMA
        state, renames the codebook to `quantizer.embed` (MLX skips `_`-prefixed attributes) and
        moves conv weights to MLX layout: Conv1d (out, in, k) -> (out, k, in), ConvTranspose1d
        (in, out, k) -> (out, k, in). A weight already in MLX layout is left as it is.
        """
        weights = normalize_weight_norm_names(dict(weights))
        expected = dict(tree_flatten(self.parameters()))
        out: dict[str, np.ndarray] = {}
        for key, value in weights.items():
            if key.startswith("enc_q.") or key.endswith(("weight_g", "._codebook.inited", "._codebook.cluster_size",
                                                         "._codebook.embed_avg")):
                continue
            value = np.asarray(value)
            if key.endswith("weight_v"):
                base = key[: -len("_v")]
                value = fuse_weight_norm(weights[base + "_g"], value, dim=0)
                key = base
            if key.endswith("._codebook.embed"):
                key = "quantizer.embed"
            value = value.astype(np.float32)
            want = expected.get(key)
            if want is not None and value.ndim == 3 and tuple(value.shape) != tuple(want.shape):
                # torch ConvTranspose1d stores (in, out, k); Conv1d stores (out, in, k)
                value = value.transpose(1, 2, 0) if key.startswith("dec.ups.") else value.transpose(0, 2, 1)
            out[key] = np.ascontiguousarray(value)
        return out

    def load_weights_from(self, weights: dict[str, np.ndarray], source: str = "weights") -> int:
        """Sanitize and load strictly: every parameter must come from `weights`, with its shape.
        Returns the number of tensors loaded."""
        return load_strict(self, self.sanitize(weights), source, what="SoVITS",
                           hint="use a GPT-SoVITS v2 SoVITS .pth")

    # ---------------------------------------------------------------- public API (numpy)

    def spectrogram(self, wav32k: np.ndarray) -> np.ndarray:
        """32 kHz mono waveform (samples,) -> linear spectrogram (1025, F) float32."""
        c = self.config
        return spectrogram(wav32k, c.filter_length, c.hop_length, c.win_length)

    def extract_latent(self, hubert_features: np.ndarray) -> np.ndarray:
        """CNHubert last hidden state (768, T) at 50 Hz -> prompt codes (T//2,) int64 at 25 Hz."""
        feats = np.asarray(hubert_features, dtype=np.float32)
        if feats.ndim != 2 or feats.shape[0] != self.config.ssl_dim:
            raise ValueError(f"hubert_features must be ({self.config.ssl_dim}, T), got {feats.shape}")
        x = self.ssl_proj(mx.array(feats.T)[None])  # (1, T//2, 768)
        codes = self.quantizer.encode(x)[0]
        return np.array(codes).astype(np.int64)

    def style_vector(self, refer_spec: np.ndarray) -> np.ndarray:
        """Reference spectrogram (1025, F) -> style vector `ge` (512,). Compute once per voice."""
        spec = np.asarray(refer_spec, dtype=np.float32)
        if spec.ndim != 2 or spec.shape[0] < self.config.style_bins:
            raise ValueError(f"refer_spec must be ({self.config.spec_channels}, F), got {spec.shape}")
        ge = self.ref_enc(mx.array(spec[: self.config.style_bins].T)[None])
        return np.array(ge[0, 0])

    def latent(
        self,
        codes: np.ndarray,
        phone_ids: np.ndarray,
        refer_spec: np.ndarray | None = None,
        *,
        ge: np.ndarray | None = None,
        speed: float = 1.0,
        noise_scale: float = 0.5,
        noise: np.ndarray | None = None,
        seed: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Everything before the vocoder: `m_p`, `logs_p`, `z` (192, T') and `ge` (512,), numpy."""
        ge_mx = self.style_array(refer_spec, ge)
        m_p, logs_p, z = self._latent(codes, phone_ids, ge_mx, speed, noise_scale, noise, seed)
        return {"m_p": np.array(m_p[0].T), "logs_p": np.array(logs_p[0].T), "z": np.array(z[0].T),
                "ge": np.array(ge_mx[0, 0])}

    def decode(
        self,
        codes: np.ndarray,
        phone_ids: np.ndarray,
        refer_spec: np.ndarray | None = None,
        *,
        ge: np.ndarray | None = None,
        speed: float = 1.0,
        noise_scale: float = 0.5,
        noise: np.ndarray | None = None,
        seed: int | None = None,
    ) -> np.ndarray:
        """Semantic codes (N,) + target phone ids (S,) + reference -> 32 kHz audio (640 * T',) float32.

        The reference is either `refer_spec` (1025, F) or a precomputed style vector `ge` (512,)
        from `style_vector`. `T' = 2N` at speed 1, else `int(2N / speed) + 1` (upstream's rule).
        `noise` (192, T') injects the standard-normal draw (for parity with a recorded run);
        otherwise it is drawn frame by frame from `numpy.random.default_rng(seed)` (`frame_noise`).
        """
        ge_mx = self.style_array(refer_spec, ge)
        _, _, z = self._latent(codes, phone_ids, ge_mx, speed, noise_scale, noise, seed)
        audio = self.vocode(z, ge_mx)
        return np.array(audio[0, :, 0], dtype=np.float32)

    def vocode(self, z: mx.array, ge: mx.array) -> mx.array:
        """HiFi-GAN: latent (1, T', 192) + style (1, 1, 512) -> audio (1, 640 * T', 1), lazily."""
        return self._in_bucket(self._vocoder, z, ge, self.config.upsample_factor)

    def flow_reverse(self, z_p: mx.array, ge: mx.array) -> mx.array:
        """The reverse flow over (1, T', 192), in a shape bucket when `bucket_frames` is set."""
        return self._in_bucket(self.flow.reverse, z_p, ge, 1)

    def _in_bucket(self, fn, x: mx.array, ge: mx.array, out_per_frame: int) -> mx.array:
        """`fn(x, ge[, mask])` on `x` (1, T, C) zero-padded to its bucket and masked past T; the output
        is cut back to the `out_per_frame * T` steps of the real frames."""
        t = x.shape[1]
        padded = self._bucket(t)
        if padded == t:
            return fn(x, ge)
        x = mx.pad(x, [(0, 0), (0, padded - t), (0, 0)])
        return fn(x, ge, frame_mask(padded, t))[:, : t * out_per_frame]

    def warm_up_buckets(self, max_frames: int = 256, *, last: int | None = None) -> float:
        """Run the flow and HiFi-GAN once per bucket shape up to `max_frames` (through the masked path
        real inputs take), so no request pays a shape's first-use costs; the bucket of `last` frames
        runs last (on CUDA the shape of the previous call is the cheap one to repeat). No-op without
        buckets. Seconds."""
        t0 = time.perf_counter()
        b = self.bucket_frames
        if b > 0:
            ge = mx.zeros((1, 1, self.config.gin_channels))
            shapes = list(range(b, self._bucket(max(1, max_frames)) + 1, b))
            if last is not None:
                final = self._bucket(max(1, last))
                shapes = [f for f in shapes if f != final] + [final]
            for frames in shapes:
                z = mx.zeros((1, frames - 1, self.config.inter_channels))
                mx.eval(self.flow_reverse(z, ge), self.vocode(z, ge))
        return time.perf_counter() - t0

    def _bucket(self, frames: int) -> int:
        b = self.bucket_frames
        return frames if b <= 0 else -(-frames // b) * b

    # ------------------------------------------ the pieces of a decode (MLX, channels-last), for streaming

    def style_array(self, refer_spec: np.ndarray | None = None, ge: np.ndarray | None = None) -> mx.array:
        """The style vector as MLX (1, 1, 512): the precomputed `ge` (512,) if given, else computed
        from `refer_spec` (1025, F). Raises ValueError when neither is given or `ge` has the wrong size."""
        if ge is not None:
            g = np.asarray(ge, dtype=np.float32).reshape(-1)
            if g.size != self.config.gin_channels:
                raise ValueError(f"ge must have {self.config.gin_channels} values, got {g.size}")
            return mx.array(g)[None, None]
        if refer_spec is None:
            raise ValueError("decode needs refer_spec (1025, F) or a style vector ge (512,)")
        return mx.array(self.style_vector(refer_spec))[None, None]

    def check_codes(self, codes) -> np.ndarray:
        """Semantic codes as a flat array (may be empty); ValueError if one lies outside the codebook."""
        codes = np.asarray(codes).reshape(-1)
        if codes.size and (codes.min() < 0 or codes.max() >= self.config.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.config.codebook_size}), got [{codes.min()}, {codes.max()}]")
        return codes

    def check_phones(self, phone_ids, speed: float) -> np.ndarray:
        """Phone ids as a flat array; ValueError if there are none, one lies outside the symbol table,
        or `speed` is not positive."""
        phones = np.asarray(phone_ids).reshape(-1)
        if phones.size == 0:
            raise ValueError("decode needs at least one phone id")
        if phones.min() < 0 or phones.max() >= self.config.n_symbols:
            raise ValueError(f"phone ids must lie in [0, {self.config.n_symbols}), got [{phones.min()}, {phones.max()}]")
        if speed <= 0:
            raise ValueError(f"speed must be positive, got {speed}")
        return phones

    def codebook_frames(self, codes: np.ndarray) -> mx.array:
        """Checked codes (N,) -> their codebook vectors at 50 Hz (1, T, 768), the input of `enc_p`."""
        q = self.quantizer.decode(mx.array(codes.astype(np.int32)))[None]  # (1, N, 768)
        if self.config.semantic_frame_rate == "25hz":
            q = mx.repeat(q, 2, axis=1)  # nearest x2 -> 50 Hz
        return q

    def _latent(self, codes, phone_ids, ge: mx.array, speed: float, noise_scale: float, noise, seed):
        codes = self.check_codes(codes)
        phones = self.check_phones(phone_ids, speed)
        if codes.size == 0:
            raise ValueError("decode needs at least one code (upstream decodes [0] when the GPT stops at once)")
        m_p, logs_p = self.enc_p(self.codebook_frames(codes), mx.array(phones.astype(np.int32))[None], ge, speed)
        if noise is not None:
            eps = np.asarray(noise, dtype=np.float32)
            if eps.shape != (m_p.shape[2], m_p.shape[1]):
                raise ValueError(f"noise must have shape {(m_p.shape[2], m_p.shape[1])}, got {eps.shape}")
            eps = mx.array(eps.T)[None]
        elif noise_scale != 0:
            # numpy, frame-major: the stream decoder draws the same rows window by window
            eps = mx.array(frame_noise(np.random.default_rng(seed), m_p.shape[1], m_p.shape[2]))[None]
        else:
            eps = None
        z_p = m_p if eps is None else m_p + eps * mx.exp(logs_p) * noise_scale
        z = self.flow_reverse(z_p, ge)
        return m_p, logs_p, z


# -------------------------------------------------------------------------------------------- loading


def check_version(path: str | Path, version_tag: str | None, config: dict, weights: dict) -> None:
    """Raise if the file is not a GPT-SoVITS v2 SoVITS checkpoint (v1, v2Pro/ProPlus, v3, v4)."""
    found = None
    if version_tag is not None and version_tag != "v2":
        found = version_tag
    else:
        emb = weights.get("enc_p.text_embedding.weight")
        section = config.get("model") if isinstance(config, dict) else None
        model_version = section.get("version") if isinstance(section, dict) else None
        if emb is not None and emb.shape[0] == V1_SYMBOLS:
            found = "v1 (322-symbol text embedding)"
        elif any(k.startswith(("sv_emb.", "ge_to512.", "prelu.")) for k in weights):
            found = "v2Pro (speaker-verification embedding layers present)"
        elif model_version not in (None, "v2"):
            found = short_repr(model_version)
    if found is not None:
        raise CheckpointError(
            f"{path}: unsupported version {found}: this engine runs GPT-SoVITS v2 SoVITS weights only. "
            "Use the v2 SoVITS_weights file of the voice (dora-primespeech's models are v2)."
        )


def _read_cache(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(config, sanitized weights) from a `.safetensors` cache written by `save_sovits_safetensors`."""
    try:
        arrays, metadata = mx.load(str(path), return_metadata=True)
    except Exception as exc:  # noqa: BLE001 - MLX raises RuntimeError/ValueError for a damaged file
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({exc}); delete it and convert the SoVITS .pth again"
        ) from None
    if metadata.get("format") != SAFETENSORS_FORMAT or "config" not in metadata:
        raise CheckpointError(
            f"{path}: not a SoVITS cache written by save_sovits_safetensors (metadata format "
            f"{metadata.get('format')!r}, expected {SAFETENSORS_FORMAT!r}); load the voice's SoVITS .pth instead"
        )
    try:
        config = json.loads(metadata["config"])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: the SoVITS cache's config metadata is not JSON ({exc})") from None
    return config, {k: np.array(v) for k, v in arrays.items()}


def default_bucket_frames() -> int:
    """Shape bucket of the flow and vocoder for the current device: 160 frames (3.2 s) on a CUDA GPU,
    none on Metal and the CPU, which have no per-shape set-up, so padding would only add work.

    Why 160 on CUDA (benchmarks/bench_stream_windows.py, H100): a convolution shape other than the
    previous call's costs ~100-150 ms of set-up there, however often it was seen before (a larger
    MLX_CUDA_CONV_CACHE_SIZE or MLX_CUDA_GRAPH_CACHE_SIZE did not help). With 32- or 64-frame
    buckets a stream's windows alternate between two shapes and each costs ~170 ms; with one
    bucket that holds every window (first window 50 frames, later ones <= 2 x 50 codes + overlap 16
    + context 12 + flow context 32 = 160) each costs ~22 ms, and whole sentences up to 3.2 s share
    that shape too.
    """
    if mx.default_device().type != mx.DeviceType.gpu or mx.metal.is_available():
        return 0
    return 160


def load_sovits(path: str | Path, *, compile_vocoder: bool = False, bucket_frames: int | None = None) -> SoVITS:
    """Read a GPT-SoVITS v2 SoVITS `.pth` (torch-free) or its `.safetensors` cache; return the MLX model.

    The config comes from the file. Loading is strict: a missing, unexpected or mis-shaped tensor
    raises `CheckpointError` naming the file, and so does a non-v2 checkpoint or a foreign cache.
    `bucket_frames` (None: `default_bucket_frames()`) sets `SoVITS.bucket_frames`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SoVITS weights not found: {path} (pass SoVITS_weights/<voice>.pth or its cache)")
    if path.suffix == ".safetensors":
        config, weights = _read_cache(path)
        version_tag = None
    else:
        ckpt = read_torch_file(path)
        obj = ckpt.obj
        if not isinstance(obj, dict) or "weight" not in obj or "config" not in obj:
            raise CheckpointError(
                f"{path}: expected a SoVITS checkpoint with 'weight' and 'config'; is this a GPT .ckpt?"
            )
        config, weights = plain_config(obj["config"], path), check_state_dict(path, obj["weight"])
        version_tag = ckpt.version_tag
    check_version(path, version_tag, config, weights)
    try:
        cfg = SoVITSConfig.from_dict(config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: bad SoVITS config ({exc})") from None
    cfg.check_weights(weights, path)
    model = SoVITS(cfg, compile_vocoder=compile_vocoder)
    # a cache holds already-sanitized weights; sanitize() is idempotent, so both forms go through it
    model.load_weights_from(weights, source=str(path))
    model.bucket_frames = default_bucket_frames() if bucket_frames is None else max(0, int(bucket_frames))
    logger.info("loaded SoVITS %s (%d tensors)", path, len(weights))
    return model


def save_sovits_safetensors(model: SoVITS, path: str | Path) -> Path:
    """Write `model`'s sanitized parameters (float32) and config to a `.safetensors` cache.

    The weights are stored after weight-norm fusion and in MLX layout, in float32 so that loading
    the cache gives the very parameters of the model, bit for bit. `load_sovits` reads the file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: v.astype(mx.float32) for k, v in tree_flatten(model.parameters())}
    metadata = {"format": SAFETENSORS_FORMAT, "config": json.dumps(asdict(model.config))}
    mx.save_safetensors(str(path), arrays, metadata=metadata)
    return path
