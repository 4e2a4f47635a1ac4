#!/usr/bin/env bash
# Run a command with MLX's CPU backend (mlx[cpu] on Linux) on OpenBLAS instead of the reference
# BLAS/LAPACK bundled in the wheel (mlx_cpu.libs/libblas-*.so, liblapack-*.so), by LD_PRELOAD.
#
#   benchmarks/cpu/with_openblas.sh [--system|--pip] [--check] [--] COMMAND [ARGS...]
#   benchmarks/cpu/with_openblas.sh --check            # verify only: bindings, speed, numerics
#
# Where OpenBLAS comes from (first that works, or forced by --system / --pip):
#   OPENBLAS_LIB=/path/libopenblas.so.0   an explicit library exporting unprefixed cblas_*/LAPACK
#   --system  a system libopenblas.so.0 found by ldconfig (Debian/Ubuntu:
#             `apt-get install libopenblas0-pthread`; Fedora: `dnf install openblas-threads`)
#   --pip     the scipy-openblas32 wheel (no root needed), downloaded once with pip into the cache;
#             its symbols carry a scipy_ prefix, so openblas_shim.c (built with -DSCIPY_PREFIX)
#             exports the unprefixed names libmlx.so imports and jumps to scipy_<name>.
# In both cases openblas_shim.c is compiled (gcc) into the cache dir
# ${XDG_CACHE_HOME:-~/.cache}/dora-primespeech-mlx/openblas/ and preloaded: its constructor drops
# LD_PRELOAD from this process's environment, so child processes (the benchmarks' upstream PyTorch
# subprocess) keep their own BLAS. MLX_OPENBLAS_INHERIT=1 keeps it for children too.
#
# Threads: OpenBLAS reads OPENBLAS_NUM_THREADS (default: all cores); left as the caller set it.
# Python: $PYTHON, else .venv/bin/python of this repo, else python3 (used to find libmlx.so and
# for pip).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/dora-primespeech-mlx/openblas"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi

mode=auto
check=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --system) mode=system; shift ;;
        --pip) mode=pip; shift ;;
        --check) check=1; shift ;;
        --) shift; break ;;
        -h|--help) sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) break ;;
    esac
done
if [[ $# -eq 0 && $check -eq 0 ]]; then
    echo "usage: $0 [--system|--pip] [--check] [--] COMMAND [ARGS...]" >&2
    exit 2
fi

log() { echo "with_openblas: $*" >&2; }

find_system_openblas() {
    if [[ -n "${OPENBLAS_LIB:-}" ]]; then echo "$OPENBLAS_LIB"; return 0; fi
    local p
    p="$( (ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null || true) \
          | awk '$1 == "libopenblas.so.0" {print $NF; exit}')"
    if [[ -n "$p" && -e "$p" ]]; then echo "$p"; return 0; fi
    for p in /usr/lib/*-linux-gnu/libopenblas.so.0 /usr/lib64/libopenblas.so.0 /usr/lib/libopenblas.so.0; do
        if [[ -e "$p" ]]; then echo "$p"; return 0; fi
    done
    return 1
}

pip_openblas() {
    # prints the directory holding libscipy_openblas.so, installing the wheel into the cache once
    local dir="$CACHE/scipy-openblas32"
    if [[ ! -e "$dir/scipy_openblas32/lib/libscipy_openblas.so" ]]; then
        log "installing scipy-openblas32 into $dir (pip, once)"
        "$PY" -m pip install --quiet --no-deps --target "$dir" scipy-openblas32 >&2
    fi
    echo "$dir/scipy_openblas32/lib"
}

build_shim() {
    # $1: variant name, rest: extra gcc args; prints the .so path
    local name="$1"; shift
    local src="$HERE/openblas_shim.c"
    local key
    key="$( (cat "$src"; echo "$name $*") | sha256sum | cut -c1-12)"
    local out="$CACHE/shim-$name-$key.so"
    if [[ ! -e "$out" ]]; then
        mkdir -p "$CACHE"
        command -v gcc >/dev/null || { log "gcc is needed to build the shim"; exit 1; }
        gcc -O2 -shared -fPIC -o "$out.tmp" "$src" "$@"
        mv "$out.tmp" "$out"
    fi
    echo "$out"
}

libmlx_path() {
    "$PY" - <<'EOF'
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("mlx")
if spec is None:
    sys.exit("mlx is not importable by this python")
for d in spec.submodule_search_locations:
    p = pathlib.Path(d) / "lib" / "libmlx.so"
    if p.exists():
        print(p)
        break
EOF
}

check_coverage() {
    # every BLAS/LAPACK symbol libmlx.so imports must be defined by what we preload
    local libmlx="$1"; shift
    [[ -n "$libmlx" ]] && command -v nm >/dev/null || return 0
    local missing=""
    local defined
    defined="$(for l in "$@"; do nm -D --defined-only "$l" 2>/dev/null | awk '{print $NF}'; done | sort -u)"
    for s in $(nm -D --undefined-only "$libmlx" | awk '{print $NF}' | grep -E '^(cblas_[a-z0-9_]+|[sdcz][a-z0-9]+_)$'); do
        grep -qx "$s" <<<"$defined" || missing="$missing $s"
    done
    if [[ -n "$missing" ]]; then
        log "warning: not covered, these stay on the bundled reference BLAS/LAPACK:$missing"
    fi
}

LIBMLX="$(libmlx_path || true)"
preload=""
if [[ "$mode" != pip ]] && sys_lib="$(find_system_openblas)"; then
    shim="$(build_shim plain)"
    preload="$sys_lib:$shim"
    check_coverage "$LIBMLX" "$sys_lib"
    log "OpenBLAS: $sys_lib (system)"
elif [[ "$mode" == system ]]; then
    log "no system libopenblas.so.0 (apt-get install libopenblas0-pthread, or use --pip)"
    exit 1
else
    libdir="$(pip_openblas)"
    shim="$(build_shim scipy -DSCIPY_PREFIX -Wl,--no-as-needed -L"$libdir" -l:libscipy_openblas.so \
            -Wl,-rpath,"$libdir")"
    preload="$shim"
    check_coverage "$LIBMLX" "$shim"
    log "OpenBLAS: $libdir/libscipy_openblas.so (scipy-openblas32 via shim)"
fi
log "LD_PRELOAD=$preload OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-<unset: all cores>}"

if [[ $check -eq 1 ]]; then
    # 1. the dynamic linker binds libmlx.so's cblas_sgemm to OpenBLAS, not to the bundled libblas
    binding="$(LD_DEBUG=bindings LD_PRELOAD="$preload" "$PY" -c \
        'import mlx.core as mx; a = mx.ones((64, 64)); mx.eval(mx.matmul(a, a, stream=mx.cpu))' 2>&1 \
        | grep -m1 "libmlx.so.*symbol \`cblas_sgemm'" || true)"
    log "binding: ${binding#*binding file }"
    if [[ "$binding" == *mlx_cpu.libs* || -z "$binding" ]]; then
        log "FAIL: cblas_sgemm is not bound to OpenBLAS"; exit 1
    fi
    # 2. speed and numerics, bundled vs preloaded
    cat > "$CACHE/check_matmul.py" <<'EOF'
import os, time
import numpy as np
import mlx.core as mx
rng = np.random.default_rng(0)
out = []
for n in (256, 1024):
    a = rng.standard_normal((n, n), dtype=np.float32); b = rng.standard_normal((n, n), dtype=np.float32)
    A, B = mx.array(a), mx.array(b)
    mx.eval(mx.matmul(A, B, stream=mx.cpu))
    reps = 20 if n == 256 else 5
    t = time.perf_counter()
    for _ in range(reps):
        mx.eval(mx.matmul(A, B, stream=mx.cpu))
    dt = (time.perf_counter() - t) / reps
    c = np.array(mx.matmul(A, B, stream=mx.cpu))
    ref = a.astype(np.float64) @ b.astype(np.float64)
    out.append(f"{n}x{n} fp32 matmul {dt * 1e3:8.2f} ms {2 * n**3 / dt / 1e9:6.1f} GFLOP/s  "
               f"rel err vs numpy fp64 {np.linalg.norm(c - ref) / np.linalg.norm(ref):.1e}")
s = rng.standard_normal((64, 64), dtype=np.float32); s = s @ s.T
w = np.array(mx.linalg.eigh(mx.array(s), stream=mx.cpu)[0])
ref = np.linalg.eigvalsh(s.astype(np.float64))
out.append(f"eigh 64x64 (LAPACK ssyevd_) max rel err {np.abs(w - ref).max() / np.abs(ref).max():.1e}")
out.append(f"LD_PRELOAD seen by this process: {os.environ.get('LD_PRELOAD')!r}")
print("\n".join(out))
EOF
    echo "--- bundled reference BLAS"
    "$PY" "$CACHE/check_matmul.py"
    echo "--- OpenBLAS preloaded"
    LD_PRELOAD="$preload" "$PY" "$CACHE/check_matmul.py"
    [[ $# -eq 0 ]] && exit 0
fi

export LD_PRELOAD="$preload${LD_PRELOAD:+:$LD_PRELOAD}"
exec "$@"
