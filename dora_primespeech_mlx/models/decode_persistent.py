"""The GPT's whole decode step (every layer and the head, one row or a few) as ONE persistent CUDA
kernel.

Why: after `decode_kernels` folded each layer into five kernels, the step was still ~150 kernels and
bound by the host: MLX spends ~8 µs of host time per primitive (H200, docs/performance.md), while the
GPU reads the step's weights in ~0.1 ms. One kernel per step leaves the host ~25 primitives (the
embedding and the sampling tail) and the GPU the weights and ~5 grid-wide barriers per layer.

How: `gridDim.x` = the GPU's multiprocessor count blocks of 256 threads, all resident at once (one
block per SM always fits: <= 48 KiB static shared memory, <= 255 registers), so a block can wait for
every other at a grid barrier (a monotonic arrival counter and a generation word in a zero-initialised
output). Per layer, separated by barriers (the post-norm layer `norm1(x + attn(x))`,
`norm2(h + mlp(h))`, in the order `decode_kernels` computes it):

  A. every block normalises the layer input itself (the previous `norm2`; layer 0 takes the
     embedding), then warps take QKV rows: Q to the work buffer, K/V straight into the cache slot;
  B. one block per (row, head): attention over the valid positions, one thread per position with an
     online softmax, merged across the warps;
  C. out-projection + bias + the normalised input -> `norm1`'s input;
  D. `norm1` in every block, linear1 + bias + ReLU;
  E. linear2 + bias + `norm1`'s output -> the next layer's input.

then the last `norm2` and the logits. Data made inside the kernel is read with `__ldcg` (L2, not the
incoherent L1). A barrier that waits ~seconds (blocks not co-resident: never expected) gives up and
the logits come out NaN instead of the GPU hanging; the self-check would then refuse the kernel.

K/V are written in place into buffers MLX sees as inputs, exactly as in `decode_kernels` (its module
docstring says why that is sound). Used only after `decode_kernels.self_check` matched it against the
MLX-op step on random inputs on this device; otherwise the five kernels per layer, then MLX's ops.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
from functools import lru_cache

import mlx.core as mx

__all__ = ["MAX_ROWS", "persistent_logits", "persistent_source", "supported_shape"]

logger = logging.getLogger(__name__)

THREADS = 256  # 8 warps; `dpm_norm_rows` gives each batch row a warp
MAX_ROWS = 8
MAX_LAYERS = 32  # 14 pointers per layer: the kernel's parameters stay under CUDA's 4 KiB
SHARED_BYTES = 32 * 1024
FALLBACK_BLOCKS = 32  # when the multiprocessor count cannot be read

_HEADER = """
#define DPM_NEG_INF (-__int_as_float(0x7f800000))

struct DpmWork {
    float* s;    // layer input before its norm (B, D)
    float* xn;   // normalised layer input (B, D)
    float* q;    // queries (B, D)
    float* at;   // attention output (B, D)
    float* t;    // norm1's input (B, D)
    float* u;    // norm1's output (B, D)
    float* f;    // linear1's output after ReLU (B, F)
    const int* offsets;  // cache slot per row (B,)
    int cap;             // K/V capacity (positions)
    unsigned int* bar;   // [arrivals, generation, timed out]
    unsigned int gen;    // barriers passed (thread 0 of each block)
    float* xs;           // shared: the block's normalised input rows (B, D)
    float* red;          // shared scratch
};

__device__ __forceinline__ float dpm_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

// every block arrives, then waits for all: a monotonic counter, so nothing is reset between rounds
__device__ __noinline__ void dpm_grid_sync(DpmWork& w) {
    __syncthreads();
    if (threadIdx.x == 0) {
        w.gen += 1;
        __threadfence();
        const unsigned int arrived = atomicAdd(&w.bar[0], 1u) + 1u;
        if (arrived == w.gen * gridDim.x) {
            __threadfence();
            atomicExch(&w.bar[1], w.gen);
        } else {
            // a block that never comes (not co-resident: never expected) must not hang the GPU: give
            // up after ~seconds, and once one barrier gave up the rest do not wait either
            volatile unsigned int* v = w.bar;
            long long spins = 0;
            while (v[1] < w.gen && v[2] == 0u) {
                if (++spins > (1ll << 22)) { atomicExch(&w.bar[2], 1u); break; }
            }
        }
        __threadfence();
    }
    __syncthreads();
}

// 4 consecutive floats from memory written earlier in this kernel (through L2)
__device__ __forceinline__ float4 dpm_ld4(const float* p) { return __ldcg(reinterpret_cast<const float4*>(p)); }

// 32 consecutive values of T as floats, through L2
template <typename T>
__device__ __forceinline__ void dpm_load32(const T* p, float* out) {
    constexpr int VW = 16 / sizeof(T);
    #pragma unroll
    for (int i = 0; i < 32 / VW; ++i) {
        const uint4 raw = __ldcg(reinterpret_cast<const uint4*>(p) + i);
        const T* e = reinterpret_cast<const T*>(&raw);
        #pragma unroll
        for (int j = 0; j < VW; ++j) out[i * VW + j] = static_cast<float>(e[j]);
    }
}

// the block's copy of B rows of `src` (B, D) in shared memory, normalised when `g` is given
template <int B, int D>
__device__ __forceinline__ void dpm_norm_rows(DpmWork& w, const float* src, const float* g, const float* be, float eps) {
    for (int i = threadIdx.x * 4; i < B * D; i += blockDim.x * 4)
        *reinterpret_cast<float4*>(w.xs + i) = dpm_ld4(src + i);
    __syncthreads();
    if (g == nullptr) return;
    const int lane = threadIdx.x & 31;
    for (int b = threadIdx.x >> 5; b < B; b += blockDim.x >> 5) {
        const float* r = w.xs + b * D;
        float s = 0.f;
        for (int i = lane; i < D; i += 32) s += r[i];
        const float mean = dpm_warp_sum(s) / D;
        float q = 0.f;
        for (int i = lane; i < D; i += 32) { const float d = r[i] - mean; q += d * d; }
        const float var = dpm_warp_sum(q) / D;
        if (lane == 0) { w.red[2 * b] = mean; w.red[2 * b + 1] = rsqrtf(var + eps); }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < B * D; i += blockDim.x) {
        const int b = i / D, d = i % D;
        w.xs[i] = (w.xs[i] - w.red[2 * b]) * w.red[2 * b + 1] * g[d] + be[d];
    }
    __syncthreads();
}

// one weight row (K of T) against B input rows: shared `xs` (SHARED) or a work buffer in global memory
template <typename T, int B, int K, bool SHARED>
__device__ __forceinline__ void dpm_row_dot(const T* wr, const float* x, float* acc) {
    constexpr int VW = 16 / sizeof(T);
    const int lane = threadIdx.x & 31;
    #pragma unroll
    for (int b = 0; b < B; ++b) acc[b] = 0.f;
    #pragma unroll
    for (int k = lane * VW; k < K; k += 32 * VW) {
        const uint4 raw = __ldg(reinterpret_cast<const uint4*>(wr + k));
        const T* e = reinterpret_cast<const T*>(&raw);
        #pragma unroll
        for (int b = 0; b < B; ++b) {
            #pragma unroll
            for (int i = 0; i < VW; i += 4) {
                const float4 xv = SHARED ? *reinterpret_cast<const float4*>(x + b * K + k + i) : dpm_ld4(x + b * K + k + i);
                acc[b] += static_cast<float>(e[i]) * xv.x + static_cast<float>(e[i + 1]) * xv.y
                          + static_cast<float>(e[i + 2]) * xv.z + static_cast<float>(e[i + 3]) * xv.w;
            }
        }
    }
    #pragma unroll
    for (int b = 0; b < B; ++b) acc[b] = dpm_warp_sum(acc[b]);
}

// phase B for one (row, head): softmax(q k^T * scale) v over positions [0, offsets[b]]
template <typename T, int D>
__device__ __forceinline__ void dpm_attention(DpmWork& w, int b, int h, const T* kc, const T* vc, float scale) {
    constexpr int H = D / 32;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int n = w.offsets[b] + 1;
    float q[32], kv[32], acc[32];
    #pragma unroll
    for (int i = 0; i < 32; i += 4) {
        const float4 v = dpm_ld4(w.q + b * D + h * 32 + i);
        q[i] = v.x; q[i + 1] = v.y; q[i + 2] = v.z; q[i + 3] = v.w;
    }
    #pragma unroll
    for (int d = 0; d < 32; ++d) acc[d] = 0.f;
    const size_t base = (static_cast<size_t>(b) * H + h) * w.cap * 32;
    float m = DPM_NEG_INF, l = 0.f;
    for (int p = threadIdx.x; p < n; p += blockDim.x) {
        dpm_load32<T>(kc + base + static_cast<size_t>(p) * 32, kv);
        float s = 0.f;
        #pragma unroll
        for (int d = 0; d < 32; ++d) s += q[d] * kv[d];
        s *= scale;
        const float mn = fmaxf(m, s);
        const float corr = expf(m - mn);
        const float e = expf(s - mn);
        l = l * corr + e;
        dpm_load32<T>(vc + base + static_cast<size_t>(p) * 32, kv);
        #pragma unroll
        for (int d = 0; d < 32; ++d) acc[d] = acc[d] * corr + e * kv[d];
        m = mn;
    }
    for (int o = 16; o > 0; o >>= 1) {  // merge the lanes' partial softmaxes
        const float mo = __shfl_xor_sync(0xffffffff, m, o);
        const float lo = __shfl_xor_sync(0xffffffff, l, o);
        const float mn = fmaxf(m, mo);
        const float ca = m == DPM_NEG_INF ? 0.f : expf(m - mn);
        const float cb = mo == DPM_NEG_INF ? 0.f : expf(mo - mn);
        l = l * ca + lo * cb;
        #pragma unroll
        for (int d = 0; d < 32; ++d) acc[d] = acc[d] * ca + __shfl_xor_sync(0xffffffff, acc[d], o) * cb;
        m = mn;
    }
    float* sm = w.red;             // (warps,)
    float* sl = w.red + 32;        // (warps,)
    float* sa = w.red + 64;        // (warps, 32)
    if (lane == 0) {
        sm[warp] = m; sl[warp] = l;
        #pragma unroll
        for (int d = 0; d < 32; ++d) sa[warp * 32 + d] = acc[d];
    }
    __syncthreads();
    if (warp == 0) {
        float M = DPM_NEG_INF;
        for (int i = 0; i < warps; ++i) M = fmaxf(M, sm[i]);
        float L = 0.f, A = 0.f;
        for (int i = 0; i < warps; ++i) {
            if (sm[i] == DPM_NEG_INF) continue;
            const float c = expf(sm[i] - M);
            L += sl[i] * c;
            A += sa[i * 32 + lane] * c;
        }
        w.at[b * D + h * 32 + lane] = A / L;
    }
    __syncthreads();
}

template <typename T, int B, int D, int F>
__device__ __noinline__ void dpm_layer(DpmWork& w, const float* s_in, const float* gp, const float* bp,
        const T* wqkv, const T* bqkv, const T* wo, const T* bo, const float* g1, const float* b1n,
        const T* w1, const T* b1, const T* w2, const T* b2, const T* kc_in, const T* vc_in, float eps, float scale) {
    constexpr int H = D / 32;
    T* kc = const_cast<T*>(kc_in);
    T* vc = const_cast<T*>(vc_in);
    const int lane = threadIdx.x & 31;
    const int gw = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int nw = gridDim.x * (blockDim.x >> 5);
    float acc[B];
    // A: the normalised input, Q, and K/V into their cache slot
    dpm_norm_rows<B, D>(w, s_in, gp, bp, eps);
    if (blockIdx.x == 0)
        for (int i = threadIdx.x; i < B * D; i += blockDim.x) w.xn[i] = w.xs[i];
    for (int row = gw; row < 3 * D; row += nw) {
        dpm_row_dot<T, B, D, true>(wqkv + static_cast<size_t>(row) * D, w.xs, acc);
        if (lane == 0) {
            const float bias = static_cast<float>(bqkv[row]);
            for (int b = 0; b < B; ++b) {
                const float y = acc[b] + bias;
                if (row < D) { w.q[b * D + row] = y; continue; }
                const int j = (row - D) % D;
                const size_t at = ((static_cast<size_t>(b) * H + j / 32) * w.cap + w.offsets[b]) * 32 + j % 32;
                (row < 2 * D ? kc : vc)[at] = static_cast<T>(y);
            }
        }
    }
    dpm_grid_sync(w);
    // B: attention, one block per (row, head)
    for (int item = blockIdx.x; item < B * H; item += gridDim.x)
        dpm_attention<T, D>(w, item / H, item % H, kc, vc, scale);
    dpm_grid_sync(w);
    // C: out-projection + bias + the normalised input
    for (int row = gw; row < D; row += nw) {
        dpm_row_dot<T, B, D, false>(wo + static_cast<size_t>(row) * D, w.at, acc);
        if (lane == 0) {
            const float bias = static_cast<float>(bo[row]);
            for (int b = 0; b < B; ++b) w.t[b * D + row] = (acc[b] + bias) + __ldcg(w.xn + b * D + row);
        }
    }
    dpm_grid_sync(w);
    // D: norm1, linear1 + bias + ReLU
    dpm_norm_rows<B, D>(w, w.t, g1, b1n, eps);
    if (blockIdx.x == 0)
        for (int i = threadIdx.x; i < B * D; i += blockDim.x) w.u[i] = w.xs[i];
    for (int row = gw; row < F; row += nw) {
        dpm_row_dot<T, B, D, true>(w1 + static_cast<size_t>(row) * D, w.xs, acc);
        if (lane == 0) {
            const float bias = static_cast<float>(b1[row]);
            for (int b = 0; b < B; ++b) w.f[b * F + row] = static_cast<float>(static_cast<T>(fmaxf(acc[b] + bias, 0.f)));
        }
    }
    dpm_grid_sync(w);
    // E: linear2 + bias + norm1's output -> the next layer's input
    for (int row = gw; row < D; row += nw) {
        dpm_row_dot<T, B, F, false>(w2 + static_cast<size_t>(row) * F, w.f, acc);
        if (lane == 0) {
            const float bias = static_cast<float>(b2[row]);
            for (int b = 0; b < B; ++b) w.s[b * D + row] = (acc[b] + bias) + __ldcg(w.u + b * D + row);
        }
    }
    dpm_grid_sync(w);
}

template <typename T, int B, int D, int V>
__device__ __forceinline__ void dpm_head(DpmWork& w, const float* g, const float* be, const T* wh, float* logits, float eps) {
    const int lane = threadIdx.x & 31;
    const int gw = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int nw = gridDim.x * (blockDim.x >> 5);
    float acc[B];
    dpm_norm_rows<B, D>(w, w.s, g, be, eps);
    // a reduced-precision model rounds the head's input to its dtype first (T2S._head)
    for (int i = threadIdx.x; i < B * D; i += blockDim.x) w.xs[i] = static_cast<float>(static_cast<T>(w.xs[i]));
    __syncthreads();
    const bool failed = *reinterpret_cast<volatile unsigned int*>(&w.bar[2]) != 0u;
    for (int row = gw; row < V; row += nw) {
        dpm_row_dot<T, B, D, true>(wh + static_cast<size_t>(row) * D, w.xs, acc);
        if (lane == 0)
            for (int b = 0; b < B; ++b) logits[b * V + row] = failed ? __int_as_float(0x7fc00000) : static_cast<float>(static_cast<T>(acc[b]));
    }
}
"""

_LAYER_INPUTS = ("wqkv", "bqkv", "wo", "bo", "g1", "be1", "w1", "b1", "w2", "b2", "g2", "be2", "kc", "vc")


def input_names(n_layer: int) -> list[str]:
    """The kernel's inputs in order: the embedded rows, their cache slots, the K/V capacity, each
    layer's parameters and K/V buffers, the head's weight."""
    names = ["x", "offsets", "capacity"]
    for i in range(n_layer):
        names += [f"{name}_{i}" for name in _LAYER_INPUTS]
    return names + ["whead"]


def persistent_source(n_layer: int, eps: float, scale: float) -> tuple[list[str], str]:
    """(input names, kernel body) for a GPT of `n_layer` layers. Template arguments: `T` (weights and
    K/V), `B` (rows), `D` (hidden), `F` (linear1's width), `V` (vocabulary)."""
    eps_l, scale_l = f"{float(eps)!r}f", f"{float(scale)!r}f"
    lines = [
        "__shared__ __align__(16) float xs[B * D];",
        "__shared__ float red[64 + 32 * 32];",
        "DpmWork w;",
        "w.s = work; w.xn = work + B * D; w.q = work + 2 * B * D; w.at = work + 3 * B * D;",
        "w.t = work + 4 * B * D; w.u = work + 5 * B * D; w.f = work + 6 * B * D;",
        "w.offsets = offsets; w.cap = capacity[0]; w.bar = sync; w.gen = 0u; w.xs = xs; w.red = red;",
    ]
    for i in range(n_layer):
        src = "x" if i == 0 else "w.s"
        norm = "nullptr, nullptr" if i == 0 else f"g2_{i - 1}, be2_{i - 1}"
        args = ", ".join(f"{name}_{i}" for name in _LAYER_INPUTS if name not in ("g2", "be2"))
        lines.append(f"dpm_layer<T, B, D, F>(w, {src}, {norm}, {args}, {eps_l}, {scale_l});")
    lines.append(f"dpm_head<T, B, D, V>(w, g2_{n_layer - 1}, be2_{n_layer - 1}, whead, logits, {eps_l});")
    return input_names(n_layer), "\n".join("    " + line for line in lines) + "\n"


_kernels: dict[tuple, object] = {}


def _kernel(n_layer: int, eps: float, scale: float):
    key = (n_layer, float(eps), float(scale))
    if key not in _kernels:
        names, body = persistent_source(n_layer, eps, scale)
        # the source's digest in the name: MLX's disk cache is keyed by name and template arguments only
        digest = hashlib.sha1((_HEADER + body).encode()).hexdigest()[:12]
        _kernels[key] = mx.fast.cuda_kernel(f"dpm_persistent_step_{digest}", names, ["logits", "work", "sync"],
                                            body, header=_HEADER)
    return _kernels[key]


@lru_cache(maxsize=1)
def multiprocessor_count() -> int:
    """The GPU's multiprocessor count (CUDA driver API; a MIG slice reports its own), which is how many
    blocks the kernel launches: one per SM, so all are resident together. FALLBACK_BLOCKS if unreadable."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        device, count = ctypes.c_int(), ctypes.c_int()
        if cuda.cuInit(0) == 0 and cuda.cuDeviceGet(ctypes.byref(device), 0) == 0 and \
                cuda.cuDeviceGetAttribute(ctypes.byref(count), 16, device) == 0 and count.value > 0:
            return int(count.value)
    except OSError:
        pass
    logger.info("could not read the GPU's multiprocessor count; the persistent decode kernel uses %d blocks",
                FALLBACK_BLOCKS)
    return FALLBACK_BLOCKS


def supported_shape(cfg, rows: int) -> str | None:
    """Why this GPT's step cannot run as the persistent kernel for `rows` rows (None: it can)."""
    d, f = cfg.hidden_dim, cfg.ffn_dim
    if not 1 <= rows <= MAX_ROWS:
        return f"{rows} rows (at most {MAX_ROWS})"
    if cfg.n_layer > MAX_LAYERS:
        return f"{cfg.n_layer} layers (at most {MAX_LAYERS})"
    if d % 256 or f % 256:  # 16-byte weight loads across a warp: 32 lanes x 8 fp16
        return f"hidden {d} / linear1 {f} (multiples of 256)"
    if rows * d * 4 > SHARED_BYTES:
        return f"{rows} rows of {d} do not fit shared memory"
    return None


def persistent_inputs(model, x: mx.array, offsets: mx.array, keys: list[mx.array], values: list[mx.array]) -> list:
    """The kernel's inputs for `model` in `input_names` order."""
    rows = x.shape[0]
    inputs = [x.reshape(rows, -1).astype(mx.float32), offsets.reshape(rows).astype(mx.int32),
              mx.array([keys[0].shape[2]], dtype=mx.int32)]
    for layer, kc, vc in zip(model.h.layers, keys, values):
        attn = layer.self_attn
        inputs += [attn.in_proj.weight, attn.in_proj.bias, attn.out_proj.weight, attn.out_proj.bias,
                   layer.norm1.weight, layer.norm1.bias, layer.linear1.weight, layer.linear1.bias,
                   layer.linear2.weight, layer.linear2.bias, layer.norm2.weight, layer.norm2.bias, kc, vc]
    return inputs + [model.ar_predict_layer.weight]


def persistent_logits(model, x: mx.array, offsets: mx.array, keys: list[mx.array], values: list[mx.array]) -> mx.array:
    """Logits (B, V) float32 of one decode step, as `decode_kernels.fused_decode_logits` (same inputs,
    K/V written in place at `offsets`), in one kernel."""
    cfg = model.config
    rows = x.shape[0]
    d, f = cfg.hidden_dim, cfg.ffn_dim
    scale = model.h.layers[0].self_attn.scale
    logits, _, _ = _kernel(cfg.n_layer, cfg.layer_norm_eps, scale)(
        inputs=persistent_inputs(model, x, offsets, keys, values),
        template=[("T", model.compute_dtype), ("B", rows), ("D", d), ("F", f), ("V", cfg.vocab_size)],
        grid=(multiprocessor_count() * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
        output_shapes=[(rows, cfg.vocab_size), (rows * (6 * d + f),), (4,)],
        output_dtypes=[mx.float32, mx.float32, mx.uint32], init_value=0)
    return logits
