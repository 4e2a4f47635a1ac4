"""The GPT's decode step (one row or a batch of rows) as five custom GPU kernels per layer instead of
~19 MLX ops.

Why: one decode step is launch-bound, not bandwidth-bound (docs/performance.md: MLX's CUDA backend
costs 4-9 µs per kernel whatever its size, and a step of ~456 kernels is ~4 ms while reading the
weights takes ~0.1 ms). Each kernel below is a matrix-vector product with its neighbours folded in:

- `qkv`:  LayerNorm of the layer input (the previous layer's `norm2`, folded into the prologue: every
          block normalises the 512-vector itself), the packed QKV projection and its bias; Q goes out,
          K and V are written straight into the layer's K/V buffers at `offset` (one write, no
          `slice_update` pair per buffer);
- attention: `attention_kernels.single_query_attention` over the valid positions only;
- `out`:  output projection + bias + the residual (the normalised layer input) -> `norm1`'s input;
- `ffn1`: `norm1` in the prologue, linear1 + bias + ReLU;
- `ffn2`: linear2 + bias + the residual (`norm1`'s output, recomputed in the prologue) -> `norm2`'s input;
- `head`: the last `norm2` in the prologue and the logits projection.

The post-norm layer `norm1(x + attn(x))`, `norm2(h + mlp(h))` is computed in the same order; only
the summation order inside each dot product differs from MLX's matmuls (fp32 accumulation), so logits
agree within ~1e-5 and greedy tokens are identical (tests/test_decode_kernels.py on the GPU host).

The K/V write is in place: the kernel writes into buffers MLX sees as inputs. That is sound here
because the decode loop owns those buffers (made by concatenation or row selection: `_fit_capacity`
in t2s_generate, `_grow` and the row bookkeeping in t2s_batch; never shared, never a slice view), the
attention that reads them depends on the kernel's Q output, and the next step's write depends on this
step's token, so every read and write is ordered on the stream. A buffer that is not row-contiguous
would be copied by MLX before the kernel (`ensure_row_contiguous`) and the write lost, which is why
the callers make fresh buffers; the GPU tests cross a capacity re-fit and compare every token.

CUDA only (MLX's `mx.fast.cuda_kernel`); used after `self_check` matched the MLX-op step on random
inputs on this device, else a WARNING and the MLX ops. Metal keeps the MLX ops: nothing here has been
measured on an Apple GPU, where the step is bound by reading weights rather than by launches.
`DPM_FUSED_DECODE=0` turns it off.

Where it can, the step goes one further: `decode_persistent` runs every layer and the head in ONE
kernel (grid-wide barriers between the phases these five kernels separate). `fused_decode_mode` says
which path a step takes: "persistent", else "kernels" (these five per layer), else None (MLX's ops);
each path is used only after its own self-check. `DPM_FUSED_DECODE=kernels` skips the persistent one.
"""

from __future__ import annotations

import hashlib
import logging
import os

import mlx.core as mx
import mlx.nn as nn

from .attention_kernels import HEAD_DIM, single_query_attention
from . import decode_persistent
from .cache import ScatterKVCache

__all__ = ["ENV_SWITCH", "fused_decode_available", "fused_decode_logits", "fused_decode_mode", "kernel_source",
           "self_check"]

logger = logging.getLogger(__name__)

ENV_SWITCH = "DPM_FUSED_DECODE"
# warps per block: one warp per output row
ROWS_PER_BLOCK = 4
# warps per (row, head) of the attention kernel (measured in docs/performance.md)
ATTENTION_WARPS = 16
# static shared memory for a block's staged inputs (rows x K fp32); CUDA allows 48 KiB in all
SHARED_BYTES = 32 * 1024
# batch rows the kernels take (their normalised inputs must fit SHARED_BYTES)
MAX_ROWS = 16

_HEADER = """
__device__ __forceinline__ float dpm_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

// sum of one value per thread over the block; every thread gets the same result (same order)
__device__ __forceinline__ float dpm_block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    v = dpm_warp_sum(v);
    __syncthreads();  // scratch may still be read by an earlier call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = 0.f;
    for (int i = 0; i < warps; ++i) total += scratch[i];
    return total;
}

// mean and 1/std of n values (two passes, like a LayerNorm)
template <typename V>
__device__ __forceinline__ void dpm_moments(const V* src, int n, float eps, float* scratch,
                                            float& mean, float& rstd) {
    float s = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += static_cast<float>(src[i]);
    mean = dpm_block_sum(s, scratch) / n;
    float q = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float d = static_cast<float>(src[i]) - mean;
        q += d * d;
    }
    rstd = rsqrtf(dpm_block_sum(q, scratch) / n + eps);
}
"""

# variant -> its inputs; "gx"/"bx" = the input is normalised in the prologue, "r" = a residual is
# added, "gr"/"br" = the residual is normalised first, "kc"/"vc"/"offsets" = K/V go to the cache
_VARIANTS = {
    "qkv": ["x", "gx", "bx", "w", "bias", "kc", "vc", "offsets"],
    "qkv0": ["x", "w", "bias", "kc", "vc", "offsets"],
    "out": ["x", "w", "bias", "r", "gr", "br"],
    "out0": ["x", "w", "bias", "r"],
    "ffn1": ["x", "gx", "bx", "w", "bias"],
    "ffn2": ["x", "w", "bias", "r", "gr", "br"],
    "head": ["x", "gx", "bx", "w"],
}


def kernel_source(variant: str, eps: float) -> tuple[list[str], str]:
    """(input names, kernel body) of one variant. Template arguments: `T` (weights and K/V), `K`
    (input length), `N` (output rows), `B` (batch rows: `x` is (B, K), `r` and the output (B, N)),
    `STAGE` (copy `x` to shared memory; always for a normalised `x`)."""
    inputs = _VARIANTS[variant]
    norm_x, norm_r = "gx" in inputs, "gr" in inputs
    eps_literal = f"{float(eps)!r}f"
    lines = [
        "__shared__ __align__(16) float xs[STAGE ? B * K : 4];",
        "__shared__ float scratch[32];",
    ]
    if norm_x:
        lines += [
            "for (int b = 0; b < B; ++b) {",
            "    float mean, rstd;",
            f"    dpm_moments(x + b * K, K, {eps_literal}, scratch, mean, rstd);",
            "    for (int i = threadIdx.x; i < K; i += blockDim.x)",
            "        xs[b * K + i] = (static_cast<float>(x[b * K + i]) - mean) * rstd * static_cast<float>(gx[i])",
            "                        + static_cast<float>(bx[i]);",
            "}",
        ]
    else:
        lines += [
            "if constexpr (STAGE) {",
            "    for (int i = threadIdx.x; i < B * K; i += blockDim.x) xs[i] = static_cast<float>(x[i]);",
            "}",
        ]
    if norm_r:
        lines += [
            "float mr_[B], rr_[B];",
            "for (int b = 0; b < B; ++b) "
            f"dpm_moments(r + b * N, N, {eps_literal}, scratch, mr_[b], rr_[b]);",
        ]
    lines += [
        "__syncthreads();",
        "const int lane = threadIdx.x & 31;",
        "const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);",
        "if (row >= N) return;",
        "const T* wr = w + static_cast<size_t>(row) * K;",
        "float acc[B];",
        "#pragma unroll",
        "for (int b = 0; b < B; ++b) acc[b] = 0.f;",
        # the weight row is read once for all batch rows; 16-byte loads (4 fp32 or 8 fp16 weights)
        "constexpr int VW = 16 / sizeof(T);",
        "if constexpr (K % (32 * VW) == 0) {",
        "    #pragma unroll",
        "    for (int k = lane * VW; k < K; k += 32 * VW) {",
        "        const uint4 raw = *reinterpret_cast<const uint4*>(wr + k);",
        "        const T* e = reinterpret_cast<const T*>(&raw);",
        "        #pragma unroll",
        "        for (int b = 0; b < B; ++b) {",
        "            #pragma unroll",
        "            for (int i = 0; i < VW; ++i)",
        "                acc[b] += static_cast<float>(e[i])",
        "                          * (STAGE ? xs[b * K + k + i] : static_cast<float>(x[b * K + k + i]));",
        "        }",
        "    }",
        "} else {",
        "    for (int k = lane; k < K; k += 32) {",
        "        const float wk = static_cast<float>(wr[k]);",
        "        #pragma unroll",
        "        for (int b = 0; b < B; ++b)",
        "            acc[b] += wk * (STAGE ? xs[b * K + k] : static_cast<float>(x[b * K + k]));",
        "    }",
        "}",
        "#pragma unroll",
        "for (int b = 0; b < B; ++b) acc[b] = dpm_warp_sum(acc[b]);",
        "if (lane != 0) return;",
        "for (int b = 0; b < B; ++b) {",
    ]
    if variant.startswith("qkv"):
        lines += [
            "    const float y = acc[b] + static_cast<float>(bias[row]);",
            "    constexpr int D = N / 3;",
            "    if (row < D) { out[b * D + row] = static_cast<T>(y); continue; }",
            "    const int j = (row - D) % D;",
            "    const int heads = kc_shape[1];",
            "    const int cap = kc_shape[2];",
            "    const int hd = kc_shape[3];",
            "    const size_t at = ((static_cast<size_t>(b) * heads + j / hd) * cap + offsets[b]) * hd + j % hd;",
            "    T* dst = const_cast<T*>(row < 2 * D ? kc : vc);",
            "    dst[at] = static_cast<T>(y);",
        ]
    elif variant == "ffn1":
        lines += ["    out[b * N + row] = static_cast<T>(fmaxf(acc[b] + static_cast<float>(bias[row]), 0.f));"]
    elif variant == "head":
        lines += ["    out[b * N + row] = acc[b];"]
    else:  # out, out0, ffn2: + bias + residual
        res = "static_cast<float>(r[b * N + row])"
        if norm_r:
            res = f"(({res} - mr_[b]) * rr_[b] * static_cast<float>(gr[row]) + static_cast<float>(br[row]))"
        lines += [f"    out[b * N + row] = (acc[b] + static_cast<float>(bias[row])) + {res};"]
    lines += ["}"]
    return inputs, "\n".join("    " + line for line in lines) + "\n"


_kernels: dict[tuple[str, float], object] = {}


def _kernel(variant: str, eps: float):
    key = (variant, float(eps))
    if key not in _kernels:
        inputs, body = kernel_source(variant, eps)
        # MLX caches compiled kernels on disk by name and template arguments, not by source: the
        # source's digest in the name keeps a cache written by another version from being loaded
        digest = hashlib.sha1((_HEADER + body).encode()).hexdigest()[:12]
        _kernels[key] = mx.fast.cuda_kernel(f"dpm_decode_{variant}_{digest}", inputs, ["out"], body,
                                            header=_HEADER)
    return _kernels[key]


def _matvec(variant: str, eps: float, inputs: list[mx.array], n: int, k: int, w_dtype: mx.Dtype,
            out_dtype: mx.Dtype, rows: int) -> mx.array:
    threads = 32 * ROWS_PER_BLOCK
    blocks = -(-n // ROWS_PER_BLOCK)
    size = n // 3 if variant.startswith("qkv") else n  # qkv: only Q goes out (K/V go to the cache)
    stage = "gx" in _VARIANTS[variant] or rows * k * 4 <= SHARED_BYTES
    (out,) = _kernel(variant, eps)(
        inputs=inputs, template=[("T", w_dtype), ("K", k), ("N", n), ("B", rows), ("STAGE", stage)],
        grid=(blocks * threads, 1, 1), threadgroup=(threads, 1, 1), output_shapes=[(rows, size)],
        output_dtypes=[out_dtype])
    return out


def fused_decode_logits(model, x: mx.array, offsets: mx.array, keys: list[mx.array],
                        values: list[mx.array], mode: str = "kernels") -> mx.array:
    """Logits (B, V) float32 of one decode step for the embedded tokens `x` (B, 1, D), row b at cache
    slot `offsets[b]` (int32 (B,), or a scalar for one row); writes the step's K/V into `keys`/`values`
    (each (B, H, capacity, 32), row-contiguous, owned by the caller) at those slots. `mode`
    "persistent": one kernel for the whole step (`decode_persistent`); "kernels": five per layer."""
    if mode == "persistent":
        rows = x.shape[0]
        return decode_persistent.persistent_logits(model, x, offsets.reshape(rows), keys, values)
    cfg = model.config
    eps = cfg.layer_norm_eps
    d = cfg.hidden_dim
    dt = model.compute_dtype
    rows = x.shape[0]
    offsets = offsets.reshape(rows).astype(mx.int32)
    lengths = offsets + 1
    h = x.reshape(rows, d).astype(mx.float32)  # the layer input before its norm (layer 0: the embedding)
    norm = None  # (gamma, beta) of the norm that turns `h` into the layer input; None for layer 0
    for layer, kc, vc in zip(model.h.layers, keys, values):
        attn = layer.self_attn
        first = norm is None  # layer 0: its input is the embedding itself, not a norm's output
        pre = () if first else norm
        q = _matvec("qkv0" if first else "qkv", eps, [h, *pre, attn.in_proj.weight, attn.in_proj.bias, kc, vc, offsets],
                    3 * d, d, dt, dt, rows)
        ctx = single_query_attention(q.reshape(rows, cfg.head, 1, HEAD_DIM), kc, vc, lengths, attn.scale,
                                     warps=ATTENTION_WARPS).reshape(rows, d)
        h1 = _matvec("out0" if first else "out", eps, [ctx, attn.out_proj.weight, attn.out_proj.bias, h, *pre],
                     d, d, dt, mx.float32, rows)
        norm1 = (layer.norm1.weight, layer.norm1.bias)
        m = _matvec("ffn1", eps, [h1, *norm1, layer.linear1.weight, layer.linear1.bias], cfg.ffn_dim, d, dt, dt,
                    rows)
        h = _matvec("ffn2", eps, [m, layer.linear2.weight, layer.linear2.bias, h1, *norm1], d, cfg.ffn_dim,
                    dt, mx.float32, rows)
        norm = (layer.norm2.weight, layer.norm2.bias)
    return _matvec("head", eps, [h, *norm, model.ar_predict_layer.weight], cfg.vocab_size, d, dt, mx.float32, rows)


def _supported(model) -> str | None:
    """Why the fused step cannot run this model here (None: it can)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return f"{ENV_SWITCH}=0"
    if mx.default_device().type != mx.gpu or not mx.cuda.is_available():
        return "not a CUDA GPU"
    cfg = model.config
    if cfg.head_dim != HEAD_DIM:
        return f"head_dim {cfg.head_dim} (the attention kernel is for {HEAD_DIM})"
    if model.compute_dtype not in (mx.float32, mx.float16, mx.bfloat16):
        return f"compute dtype {model.compute_dtype}"
    if any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()):
        return "quantised weights"
    return None  # sizes: fused_decode_available checks the rows' inputs against the shared memory


def _check_rows(model, offsets: list[int], capacity: int, mode: str = "kernels") -> tuple[float, float]:
    """(logits error relative to their magnitude, K/V error) of one fused step against the MLX-op step
    for rows at cache slots `offsets`, on random K/V buffers and embedded tokens."""
    cfg = model.config
    dt = model.compute_dtype
    rows = len(offsets)
    k0, k1, k2 = mx.random.split(mx.random.key(11 + rows), 3)
    shape = (rows, cfg.head, capacity, cfg.head_dim)
    base_k = [mx.random.normal(shape, key=k).astype(dt) for k in mx.random.split(k0, cfg.n_layer)]
    base_v = [mx.random.normal(shape, key=k).astype(dt) for k in mx.random.split(k1, cfg.n_layer)]
    x = mx.random.normal((rows, 1, cfg.hidden_dim), key=k2)
    slots = mx.array(offsets, dtype=mx.int32)
    # fresh row-contiguous buffers for the fused path (it writes in place)
    fk = [k + 0 for k in base_k]
    fv = [v + 0 for v in base_v]
    mx.eval(fk, fv)
    got = fused_decode_logits(model, x, slots if rows > 1 else slots[0], fk, fv, mode)
    mx.eval(got, fk, fv)
    caches = [ScatterKVCache(k, v, slots) for k, v in zip(base_k, base_v)]
    valid = (mx.arange(capacity)[None] <= slots[:, None])[:, None, None, :]
    want = model._head(model(x, valid, caches)[:, -1, :])
    mx.eval(want)
    scale = max(1.0, float(mx.max(mx.abs(want)).item()))
    err = float(mx.max(mx.abs(got - want)).item()) / scale
    kv_err = 0.0
    for mine, ref in zip(fk + fv, [c.keys for c in caches] + [c.values for c in caches]):
        kv_err = max(kv_err, float(mx.max(mx.abs(mine.astype(mx.float32) - ref.astype(mx.float32))).item()))
    return err, kv_err


_MODE_NAMES = {"kernels": "fused decode kernels", "persistent": "the persistent decode kernel"}


def self_check(model, tol: float = 1e-4, mode: str = "kernels") -> bool:
    """Run fused steps (`mode`) against the MLX-op steps of `model` (one row; three rows at different
    slots) on random caches and tokens; True when the logits agree within `tol` (relative to their
    magnitude) and the K/V buffers match after the write. Errors and mismatches log a WARNING."""
    what = _MODE_NAMES[mode]
    fallback = "the fused decode kernels" if mode == "persistent" else "MLX's ops"
    try:
        err, kv_err = _check_rows(model, [37], 64, mode)
        err3, kv_err3 = _check_rows(model, [0, 130, 63], 192, mode)
        err, kv_err = max(err, err3), max(kv_err, kv_err3)
    except Exception as exc:  # noqa: BLE001 - any failure means: the next path down
        logger.warning("%s failed its self-check (%s: %s); decoding with %s", what, type(exc).__name__,
                       str(exc)[:300], fallback)
        return False
    fp32 = model.compute_dtype == mx.float32
    step_tol, kv_tol = (tol, 1e-4) if fp32 else (5e-2, 2e-2)
    if not (err <= step_tol and kv_err <= kv_tol):  # NaN (a kernel that gave up at a barrier) fails too
        logger.warning("%s differs from MLX's ops on this device (logits %.2e, K/V %.2e); decoding with %s",
                       what, err, kv_err, fallback)
        return False
    logger.info("%s checked on %s: logits %.2e, K/V %.2e", what, mx.default_device(), err, kv_err)
    return True


def fused_decode_mode(model, rows: int = 1) -> str | None:
    """Which fused path a decode step of `rows` rows takes on this device: "persistent" (one kernel,
    `decode_persistent`), "kernels" (five per layer) or None (MLX's ops). A path needs CUDA, a
    supported model, rows that fit its shared memory, and its self-check passed for this model at its
    current precision. The decisions are cached on the model per switch, device and precision: the
    batched decoder asks at every step, and `_supported`'s module scan alone costs ~0.5 ms."""
    if not 1 <= rows <= MAX_ROWS or rows * model.config.hidden_dim * 4 > SHARED_BYTES:
        return None
    cache = model.__dict__.setdefault("_fused_decode_checked", {})
    switch = os.environ.get(ENV_SWITCH, "1")
    key = (switch, str(mx.default_device()), model.precision, str(model.compute_dtype))
    if key not in cache:
        kernels = _supported(model) is None and self_check(model)
        persistent = (kernels and switch != "kernels" and decode_persistent.supported_shape(model.config, 3) is None
                      and self_check(model, mode="persistent"))
        cache[key] = (kernels, persistent)
    kernels, persistent = cache[key]
    if persistent and decode_persistent.supported_shape(model.config, rows) is None:
        return "persistent"
    return "kernels" if kernels else None


def fused_decode_available(model, rows: int = 1) -> bool:
    """True when a decode step of `rows` rows runs on a fused path (`fused_decode_mode`)."""
    return fused_decode_mode(model, rows) is not None
