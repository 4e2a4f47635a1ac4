"""Fused single-query attention for the GPT's decode step (head_dim 32), as a custom GPU kernel.

MLX's fused attention has no kernel for head_dim 32 (CUDA's vector kernel covers 64/96/128, Metal's
starts at 64), so `mx.fast.scaled_dot_product_attention` falls back to separate ops (scores matmul,
mask, softmax, values matmul) over the whole padded K/V capacity. Decode is bound by launching
kernels, not by arithmetic, so one kernel that reads only the valid positions pays.

`single_query_attention(q, k, v, lengths, scale)`: q (B, H, 1, 32), k/v (B, H, capacity, 32), lengths
(B,) int32 = valid positions per row (a row attends to positions `< lengths[b]`). One block of WARPS
warps per (row, head): each warp walks every WARPS-th position, a lane holds one channel, the score
is a warp reduction and the softmax is online (running max and sum), the warps merge at the end.

Opt-in (`DPM_FUSED_ATTENTION=1`): measured on the H200 it did not pay (docs/performance.md). The
kernel is used only after `self_check` compared it with the reference ops on random inputs on
this device (any error or mismatch: a WARNING and the reference path). CUDA is checked on the NVIDIA
host (tests and benchmarks/bench_decode.py); the Metal kernel is checked by the same self-check on a
Mac at load time, since CI cannot run Metal.
"""

from __future__ import annotations

import hashlib
import logging
import os

import mlx.core as mx

__all__ = ["HEAD_DIM", "fused_attention_available", "reference_attention", "self_check", "single_query_attention"]

logger = logging.getLogger(__name__)

HEAD_DIM = 32
# warps (CUDA) / simdgroups (Metal) of 32 per (row, head): each walks every WARPS-th position;
# DPM_FUSED_WARPS overrides (1..32) for measurement
WARPS = 16
# opt-in: on the H200 the kernel measured no steady gain over MLX's ops (docs/performance.md), so
# "1" turns it on; anything else leaves decode on MLX's ops
ENV_SWITCH = "DPM_FUSED_ATTENTION"

_CUDA_SOURCE = """
    const int bh = blockIdx.x;
    const int H = q_shape[1];
    const int C = k_shape[2];
    const int b = bh / H;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int n = lengths[b];
    const float scale = static_cast<float>(scale_arr[0]);
    const float qd = static_cast<float>(q[bh * 32 + lane]);
    const T* kb = k + (size_t)bh * C * 32;
    const T* vb = v + (size_t)bh * C * 32;
    float m = -INFINITY, l = 0.f, acc = 0.f;
    for (int t = warp; t < n; t += WARPS) {
        float s = qd * static_cast<float>(kb[t * 32 + lane]);
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
        s *= scale;
        const float m_new = fmaxf(m, s);
        const float corr = expf(m - m_new);
        const float p = expf(s - m_new);
        l = l * corr + p;
        acc = acc * corr + p * static_cast<float>(vb[t * 32 + lane]);
        m = m_new;
    }
    __shared__ float sm[WARPS];
    __shared__ float sl[WARPS];
    __shared__ float sacc[WARPS][32];
    if (lane == 0) { sm[warp] = m; sl[warp] = l; }
    sacc[warp][lane] = acc;
    __syncthreads();
    if (warp == 0) {
        float M = -INFINITY;
        for (int w = 0; w < WARPS; ++w) M = fmaxf(M, sm[w]);
        float L = 0.f, A = 0.f;
        for (int w = 0; w < WARPS; ++w) {
            if (sm[w] == -INFINITY) continue;
            const float c = expf(sm[w] - M);
            L += sl[w] * c;
            A += sacc[w][lane] * c;
        }
        out[bh * 32 + lane] = static_cast<T>(A / L);
    }
"""

_METAL_SOURCE = """
    const uint bh = threadgroup_position_in_grid.x;
    const uint tid = thread_position_in_threadgroup.x;
    const int H = q_shape[1];
    const int C = k_shape[2];
    const int b = bh / H;
    const uint warp = tid / 32;
    const uint lane = tid % 32;
    const int n = lengths[b];
    const float scale = static_cast<float>(scale_arr[0]);
    const float qd = static_cast<float>(q[bh * 32 + lane]);
    const device T* kb = k + (size_t)bh * C * 32;
    const device T* vb = v + (size_t)bh * C * 32;
    float m = -INFINITY, l = 0.f, acc = 0.f;
    for (int t = warp; t < n; t += WARPS) {
        float s = simd_sum(qd * static_cast<float>(kb[t * 32 + lane])) * scale;
        const float m_new = fmax(m, s);
        const float corr = metal::precise::exp(m - m_new);
        const float p = metal::precise::exp(s - m_new);
        l = l * corr + p;
        acc = acc * corr + p * static_cast<float>(vb[t * 32 + lane]);
        m = m_new;
    }
    threadgroup float sm[WARPS];
    threadgroup float sl[WARPS];
    threadgroup float sacc[WARPS][32];
    if (lane == 0) { sm[warp] = m; sl[warp] = l; }
    sacc[warp][lane] = acc;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (warp == 0) {
        float M = -INFINITY;
        for (int w = 0; w < WARPS; ++w) M = fmax(M, sm[w]);
        float L = 0.f, A = 0.f;
        for (int w = 0; w < WARPS; ++w) {
            if (sm[w] == -INFINITY) continue;
            const float c = metal::precise::exp(sm[w] - M);
            L += sl[w] * c;
            A += sacc[w][lane] * c;
        }
        out[bh * 32 + lane] = static_cast<T>(A / L);
    }
"""

_kernel = None
_checked: dict[str, bool] = {}  # device name -> passed the self-check


def _backend() -> str | None:
    if mx.default_device().type != mx.gpu:
        return None
    if mx.cuda.is_available():
        return "cuda"
    if mx.metal.is_available():
        return "metal"
    return None


def _build(backend: str):
    global _kernel
    if _kernel is None:
        names = (["q", "k", "v", "lengths", "scale_arr"], ["out"])
        # MLX caches compiled CUDA kernels on disk by name, not by source: the name carries a digest
        source = _CUDA_SOURCE if backend == "cuda" else _METAL_SOURCE
        name = f"dpm_sq_attention_hd32_{hashlib.sha1(source.encode()).hexdigest()[:12]}"
        if backend == "cuda":
            _kernel = mx.fast.cuda_kernel(name, *names, source)
        else:
            _kernel = mx.fast.metal_kernel(name, *names, source)
    return _kernel


def single_query_attention(q: mx.array, k: mx.array, v: mx.array, lengths: mx.array, scale: float,
                           warps: int | None = None) -> mx.array:
    """The fused kernel (no availability check: see `fused_attention_available`); `warps` per
    (row, head), default `WARPS` or `DPM_FUSED_WARPS`."""
    B, H, _, D = q.shape
    kernel = _build(_backend())
    if warps is None:
        warps = int(os.environ.get("DPM_FUSED_WARPS", WARPS))
    warps = min(32, max(1, int(warps)))
    (out,) = kernel(inputs=[q, k, v, lengths.astype(mx.int32), mx.array([scale], dtype=mx.float32)],
                    template=[("T", q.dtype), ("WARPS", warps)], grid=(B * H * 32 * warps, 1, 1),
                    threadgroup=(32 * warps, 1, 1),
                    output_shapes=[(B, H, 1, D)], output_dtypes=[q.dtype])
    return out


def reference_attention(q: mx.array, k: mx.array, v: mx.array, lengths: mx.array, scale: float) -> mx.array:
    """What the kernel computes, with MLX's own ops (the decode step's path without the kernel)."""
    valid = (mx.arange(k.shape[2])[None] < lengths[:, None])[:, None, None, :]
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=valid)


def self_check(dtype: mx.Dtype = mx.float32, tol: float | None = None) -> bool:
    """Compare the kernel with `reference_attention` on random inputs (several rows, lengths, a
    capacity past one block); True when it agrees. Errors and mismatches log a WARNING."""
    tol = tol if tol is not None else (1e-5 if dtype == mx.float32 else 2e-2)
    try:
        key = mx.random.key(7)
        kq, kk, kv = mx.random.split(key, 3)
        B, H, C = 3, 16, 300
        q = mx.random.normal((B, H, 1, HEAD_DIM), key=kq).astype(dtype)
        k = (3 * mx.random.normal((B, H, C, HEAD_DIM), key=kk)).astype(dtype)
        v = mx.random.normal((B, H, C, HEAD_DIM), key=kv).astype(dtype)
        lengths = mx.array([1, 137, 300], dtype=mx.int32)
        scale = HEAD_DIM ** -0.5
        got = single_query_attention(q, k, v, lengths, scale).astype(mx.float32)
        want = reference_attention(q, k, v, lengths, scale).astype(mx.float32)
        err = float(mx.max(mx.abs(got - want)).item())
    except Exception as exc:  # noqa: BLE001 - any failure means: use the reference path
        logger.warning("fused head_dim-32 attention kernel failed its self-check (%s: %s); using MLX's ops",
                       type(exc).__name__, str(exc)[:300])
        return False
    if not err <= tol:
        logger.warning("fused head_dim-32 attention kernel differs from MLX's ops by %.2e (> %.0e) on this device; "
                       "using MLX's ops", err, tol)
        return False
    logger.info("fused head_dim-32 attention kernel checked on %s: max |diff| %.2e", mx.default_device(), err)
    return True


def fused_attention_available(head_dim: int, dtype: mx.Dtype = mx.float32) -> bool:
    """True when the kernel may run here: switched on (`DPM_FUSED_ATTENTION=1`), a GPU backend with
    custom kernels, head_dim 32, and the kernel passed `self_check` on this device (once per process
    and dtype)."""
    if head_dim != HEAD_DIM or os.environ.get(ENV_SWITCH, "0") != "1":
        return False
    backend = _backend()
    if backend is None:
        return False
    name = f"{backend}:{dtype}"
    if name not in _checked:
        _checked[name] = self_check(dtype)
    return _checked[name]
