#!/usr/bin/env bash
# On the GPU machine (MLX's CUDA backend, our stand-in for Apple's GPU): parity figures and
# benchmarks of MLX against upstream PyTorch on CUDA, in one run on one card.
#
# Nothing can be downloaded there and one call carries at most 64 MiB, so wheels travel in parts,
# in back-to-back calls while the machine is warm (docs/performance.md):
#   .gpu/a: mlx-cuda-13 wheel part aa + text-frontend wheels      -> run with `stage`
#   .gpu/b: part ab, mlx, gpt-sovits-cpufast, soundfile, soxr, cffi -> `stage`
#   .gpu/c: jieba, jieba_fast (cp312)                              -> `stage install <steps>`
# Steps: stage install parity tests t2s sovits encoders memory shapes precision e2e. Results go to $OUT.
set -euo pipefail
STAGE=/tmp/wheelstage
DEPS=/tmp/pydeps
ORACLE_PKGS=/tmp/oracle_pkgs
export PYTHONPATH="$DEPS:$PWD"
export DORA_PRIMESPEECH_MLX_ORACLE_PYTHON=/tmp/oracle_python
export DORA_PRIMESPEECH_MLX_CACHE=/tmp/dpm-cache
export ORACLE_TORCH_DEVICE=cuda
# fp32 as on Apple GPUs: MLX-CUDA uses TF32 matmuls by default (errors ~1e-3 instead of ~1e-6)
export MLX_ENABLE_TF32="${MLX_ENABLE_TF32:-0}"
export PYTHONUNBUFFERED=1
for step in "$@"; do
  case "$step" in
    stage) mkdir -p "$STAGE"; for d in .gpu/a .gpu/b .gpu/c; do [ -d "$d" ] && cp "$d"/* "$STAGE"/ 2>/dev/null || true; done
           ls "$STAGE" ;;
    install)
      cat "$STAGE"/mlxcuda.part.aa "$STAGE"/mlxcuda.part.ab > "$STAGE"/mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl
      python3 -m pip install -q --no-index --no-deps --target "$ORACLE_PKGS" "$STAGE"/gpt_sovits_cpufast-*.whl \
        "$STAGE"/jieba_fast-*.whl
      python3 -m pip install -q --no-index --no-deps --target "$DEPS" $(ls "$STAGE"/*.whl | grep -v -e gpt_sovits -e jieba_fast)
      printf '#!/bin/sh\nPYTHONPATH=%s:%s exec python3 "$@"\n' "$ORACLE_PKGS" "$DEPS" > /tmp/oracle_python
      chmod +x /tmp/oracle_python
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
      python3 -c "import mlx.core as mx, torch; print('mlx', mx.__version__, mx.default_device(), 'torch', torch.__version__)" \
        | tee -a "$OUT/gpu.txt"
      python3 tools/oracle/oracle_env.py fixtures > "$OUT/fixtures.log" 2>&1 ;;
    parity) python3 benchmarks/parity_report.py --json "$OUT/parity.json" > "$OUT/parity.log" 2>&1 || tail -20 "$OUT/parity.log" ;;
    tests) python3 -m pytest -q -p no:cacheprovider tests/test_t2s.py tests/test_sovits.py tests/test_sovits_stream.py \
             tests/test_encoders.py tests/test_precision.py \
             > "$OUT/tests.log" 2>&1 || true; tail -5 "$OUT/tests.log" ;;
    t2s) python3 benchmarks/bench_t2s.py --tokens 100 500 --json "$OUT/bench_t2s.json" 2>&1 | tail -12 ;;
    sovits) python3 benchmarks/bench_sovits.py --json "$OUT/bench_sovits.json" 2>&1 | tail -12 ;;
    encoders) python3 benchmarks/bench_encoders.py --json "$OUT/bench_encoders.json" 2>&1 | tail -14 ;;
    memory) python3 benchmarks/bench_memory.py --json "$OUT/bench_memory.json" 2>&1 | tail -4 ;;
    precision) python3 benchmarks/bench_precision.py --json "$OUT/bench_precision.json" 2>&1 | tail -8 ;;
    windows) for cfg in "" "MLX_CUDA_GRAPH_CACHE_SIZE=4096"; do echo "== env: ${cfg:-default}"
               env $cfg python3 benchmarks/bench_stream_windows.py --json "$OUT/bench_stream_windows${cfg:+_graph4096}.json" 2>&1 | grep -v Warn | tail -13; done ;;
    e2e-fc15) python3 benchmarks/bench_e2e.py --no-torch --first-chunk-tokens 15 --json "$OUT/bench_e2e_first15.json" 2>&1 | tail -22 ;;
    shapes) python3 benchmarks/bench_shapes.py --json "$OUT/bench_shapes.json" 2>&1 | tail -40 ;;
    e2e) python3 benchmarks/bench_e2e.py --json "$OUT/bench_e2e.json" 2>&1 | tail -30 ;;
  esac
done
