#!/usr/bin/env bash
# The whole product on an NVIDIA GPU host without network, the way a Linux NVIDIA user installs it:
# our wheel with --no-deps, its dependencies, and MLX's CUDA backend (`mlx` + `mlx-cuda-13`, no
# `mlx-cpu`), then the real node in a real `dora run` (node_check.py) on random-weight voices.
#
# Nothing can be downloaded there and one call carries at most 64 MiB, so the wheels travel in three
# folders (git-ignored), carried in back-to-back calls while the machine is warm (docs/user-guide.md,
# "Linux with an NVIDIA GPU", lists the wheels and how to make them):
#   .gpu/1  mlx-cuda-13 part 00, dora-rs-cli, small deps   -> `stage 1`
#   .gpu/2  part 01, dora-rs, g2p_en, nltk                  -> `stage 2`
#   .gpu/3  part 02, mlx, our wheel, the text frontend      -> `stage 3 install smoke rule check`
#   .gpu/4  gpt-sovits-cpufast 0.1.0, einops (the oracle)   -> `parity` (after the three above)
# `parity` runs the numerical parity tests (MLX against upstream PyTorch) from the working tree: the
# host's python3 with its own torch and transformers is the oracle (DORA_PRIMESPEECH_MLX_ORACLE_PYTHON,
# a wrapper that adds .gpu/4's wheels), which builds the fixtures on the CPU first (cached).
# PARITY_TESTS="tests/x.py ..." runs other test files.
# Results go to $OUT.
set -euo pipefail
STAGE=/tmp/wheelstage
SITE=/tmp/site
MODELS=/tmp/smoke-models
MLX_CUDA_SHA256=94cb48fba73e5ee39467e51c35c51c691123359ca17bafd1a24cf92ad6732bee
ORACLE_SITE=/tmp/oracle-site
ORACLE_PYTHON=/tmp/oracle-python
PARITY_DEFAULT="tests/test_t2s.py tests/test_sovits.py tests/test_sovits_stream.py tests/test_encoders.py tests/test_precision.py
  tests/test_t2s_batch.py tests/test_attention_kernel.py"
export PYTHONUNBUFFERED=1
# fp32 as on Apple GPUs: MLX-CUDA uses TF32 matmuls by default
export MLX_ENABLE_TF32="${MLX_ENABLE_TF32:-0}"
ROOT="$PWD"
while [ $# -gt 0 ]; do
  step="$1"; shift
  case "$step" in
    stage) mkdir -p "$STAGE"; cp ".gpu/$1"/* "$STAGE"/; shift; ls "$STAGE" | wc -l ;;
    install)
      cat "$STAGE"/mlxcuda.part.0? > "$STAGE"/mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl
      echo "$MLX_CUDA_SHA256  $STAGE/mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl" | sha256sum -c -
      python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$STAGE"/*.whl
      if ls "$SITE" | grep -qi '^mlx_cpu'; then echo "mlx-cpu must not be installed beside mlx-cuda"; exit 1; fi
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
      (cd /tmp && PYTHONPATH="$SITE" python3 -c "import mlx.core as mx, dora_primespeech_mlx as d; print('mlx', mx.__version__, mx.default_device(), 'package at', d.__file__)") | tee -a "$OUT/gpu.txt" ;;
    smoke) (cd /tmp && PYTHONPATH="$SITE" python3 -c "from dora_primespeech_mlx.smoke import build_smoke_model_dir; print(build_smoke_model_dir('$MODELS'))") ;;
    first) (cd /tmp && PYTHONPATH="$SITE" python3 "$ROOT/benchmarks/device/first_request.py" "$MODELS" --json "$OUT/first_request.json" 2>&1 | grep -v ' INFO ' | tail -12) ;;
    rule) (cd /tmp && PYTHONPATH="$SITE" python3 "$ROOT/benchmarks/device/thread_rule.py" "$MODELS" 2>&1 | grep -v ' INFO ' | tee "$OUT/thread_rule.txt") ;;
    upstream) # upstream main's CUDA-graph T2S on the same smoke GPT (its code in the git-ignored .gpu/upstream)
      (cd "$ROOT" && python3 tools/oracle/bench_t2s_cudagraph_torch.py --upstream .gpu/upstream --model-dir "$MODELS" \
        --tokens 300 --repeats 5 --dtype fp32 fp16 --modes graph --tqdm off --save-inputs "$OUT/t2s_inputs.npz" \
        --json "$OUT/upstream_cudagraph.json" 2> "$OUT/upstream_stderr.txt" | tail -30) || tail -20 "$OUT/upstream_stderr.txt" ;;
    ktest) # the fused-kernel and batched-decode tests on the GPU, from the working tree
      (cd "$ROOT" && PYTHONPATH="$ROOT:$SITE" python3 -m pytest -q -p no:cacheprovider tests/test_attention_kernel.py tests/test_decode_kernels.py tests/test_decode_persistent.py \
        tests/test_t2s_batch.py > "$OUT/ktest.log" 2>&1; tail -5 "$OUT/ktest.log") ;;
    sched) # concurrent requests sharing decode steps (engine_scheduler): its tests, then the benchmark on the smoke voice
      (cd "$ROOT" && PYTHONPATH="$ROOT:$SITE" python3 -m pytest -q -p no:cacheprovider tests/test_engine_scheduler.py \
        > "$OUT/sched_test.log" 2>&1; tail -5 "$OUT/sched_test.log")
      (cd "$ROOT" && PYTHONPATH="$ROOT:$SITE" python3 benchmarks/bench_scheduler.py --model-dir "$MODELS" --requests 8 \
        --tokens 100 --rounds 3 --json "$OUT/bench_scheduler.json" 2>&1 | grep -v ' INFO ' | tail -8) ;;
    decode) # decode, batch: medians over processes (benchmarks/bench_decode.py), from the working tree
      (cd "$ROOT" && PYTHONPATH="$ROOT:$SITE" python3 benchmarks/bench_decode.py --model-dir "$MODELS" --processes "$1" \
        --parts decode batch --inputs "$OUT/t2s_inputs.npz" --precisions fp32 fp16 --json "$OUT/bench_decode.json" \
        2>&1 | tail -40); shift ;;
    engine) # first audio, 10-character whole, batched whole text (benchmarks/bench_decode.py --parts engine)
      (cd "$ROOT" && PYTHONPATH="$ROOT:$SITE" python3 benchmarks/bench_decode.py --model-dir "$MODELS" --processes "$1" \
        --parts engine --json "$OUT/bench_engine.json" 2>&1 | tail -20); shift ;;
    serverload) # gpt-sovits-mlx serve on the smoke voice (a GPU: requests share steps), 8 and 1 clients, then stop
      (cd /tmp && PRIMESPEECH_MODEL_DIR="$MODELS" MAX_NEW_TOKENS=50 GPT_SOVITS_VOICES_DIR=/tmp/user-voices \
        PYTHONPATH="$SITE" python3 -m dora_primespeech_mlx.cli serve --port 18765 > "$OUT/serve.log" 2>&1 &
        get() { python3 -c "import sys,urllib.request as u; print(u.urlopen(sys.argv[1], timeout=5).read().decode())" "$1" 2>/dev/null; }
        for _ in $(seq 300); do get http://127.0.0.1:18765/health > /dev/null && break; sleep 0.5; done
        get http://127.0.0.1:18765/health
        for c in 8 1; do PYTHONPATH="$SITE" python3 "$ROOT/benchmarks/server_load.py" --url http://127.0.0.1:18765 \
          --clients $c --requests 3 --json "$OUT/server_load_${c}x3.json" 2>&1 | tail -4; done
        get http://127.0.0.1:18765/metrics | grep -E '^[a-z_]+(_total|_count|_sum)' | head -12
        pkill -f "dora_primespeech_mlx.cli serve" || true) ;;
    parity) # MLX against upstream PyTorch: oracle from the host's torch + .gpu/4, fixtures, then the tests
      export DORA_PRIMESPEECH_MLX_ORACLE_PYTHON="$ORACLE_PYTHON"
      export DORA_PRIMESPEECH_MLX_CACHE="${DORA_PRIMESPEECH_MLX_CACHE:-/tmp/dpm-cache}"
      if [ ! -x "$ORACLE_PYTHON" ]; then
        pin=$(sed -n 's/^ORACLE_WHEEL_SHA256 = "\([0-9a-f]*\)"$/\1/p' "$ROOT/tools/oracle/oracle_env.py")
        echo "$pin  $(ls "$ROOT"/.gpu/4/gpt_sovits_cpufast-0.1.0-*.whl)" | sha256sum -c -
        python3 -m pip install -q --no-index --no-deps --no-compile --target "$ORACLE_SITE" "$ROOT"/.gpu/4/*.whl
        printf '#!/bin/sh\nPYTHONPATH=%s exec %s "$@"\n' "$ORACLE_SITE" "$(command -v python3)" > "$ORACLE_PYTHON"
        chmod +x "$ORACLE_PYTHON"
      fi
      (cd /tmp && "$ORACLE_PYTHON" -c "import numpy, torch, transformers, tokenizers, yaml, tqdm, packaging, einops, GPT_SoVITS
print('oracle: torch', torch.__version__, 'transformers', transformers.__version__, 'numpy', numpy.__version__)") | tee "$OUT/oracle.txt"
      (cd "$ROOT" && python3 tools/oracle/oracle_env.py fixtures > "$OUT/fixtures.log" 2>&1) || { tail -30 "$OUT/fixtures.log"; exit 1; }
      tail -n 2 "$OUT/fixtures.log"
      rc=0
      (cd "$ROOT" && PYTHONPATH="$ROOT:$SITE" python3 -m pytest -q -p no:cacheprovider --junitxml "$OUT/parity.xml" \
        ${PARITY_TESTS:-$PARITY_DEFAULT} > "$OUT/parity.log" 2>&1) || rc=$?
      tail -n 30 "$OUT/parity.log"
      [ "$rc" = 0 ] || { echo "parity: pytest exited $rc"; exit "$rc"; } ;;
    check)
      export PATH="$SITE/bin:$PATH" PYTHONPATH="$SITE"
      (cd /tmp && python3 "$ROOT/benchmarks/device/node_check.py" --model-dir "$MODELS" --out /tmp/node_check \
        --max-first-ratio 1.2 --json "$OUT/node_check.json" "$@" 2>&1 | tee "$OUT/node_check.txt") || true
      cp /tmp/node_check/dora_run.log "$OUT/node_check_dora_run.log" 2>/dev/null || true
      set -- ;;
  esac
done
