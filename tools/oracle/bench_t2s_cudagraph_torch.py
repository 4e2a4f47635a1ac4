"""Upstream GPT-SoVITS's CUDA-graph T2S decode, timed on our checkpoint and inputs (issue 20, item 4).

Measurement only. Upstream's code is not part of this repository: export it, at the commit you
measure, into the git-ignored folder `.gpu/upstream/` (its `GPT_SoVITS/AR/models/t2s_model_cudagraph.py`,
`embedding_cudagraph.py`, `structs_cudagraph.py`, the two empty `__init__.py` above them, and a
`COMMIT` file holding the hash), then point `--upstream` at it. This script imports that module at run
time; none of upstream's code is copied here. From a clone (or bare mirror) of RVC-Boss/GPT-SoVITS:

    git -C UPSTREAM archive HEAD LICENSE GPT_SoVITS/AR/__init__.py GPT_SoVITS/AR/models/__init__.py \
        GPT_SoVITS/AR/models/{t2s_model,embedding,structs}_cudagraph.py | tar -x -C .gpu/upstream
    git -C UPSTREAM rev-parse HEAD > .gpu/upstream/COMMIT

    python tools/oracle/bench_t2s_cudagraph_torch.py --upstream .gpu/upstream \\
        --model-dir /tmp/smoke --build-smoke --tokens 500 --repeats 5 --dtype fp32 fp16 \\
        --save-inputs /tmp/t2s_inputs.npz --json out.json

What it runs: upstream's `CUDAGraphRunner.generate` (its `load_decoder` builds `T2SDecoder` from the
`.ckpt` with a strict state-dict load), batch size 1, the request the web UI sends (`top_k` 5,
`top_p` 1, temperature 1, repetition penalty 1.35, `use_cuda_graph=True`) with
`early_stop_num = N - 1`, so a run returns exactly N tokens unless EOS comes first. The smoke GPT
makes EOS rare (its EOS output row is scaled by 0.1, as in benchmarks/bench_t2s.py); `--eos mask`
instead gives the output head a bias of -inf at EOS (the same matmul, at most one more tiny kernel),
for real checkpoints. A run that stops short is reported and the script exits 1.

Timing: a forward pre-hook on `ar_audio_embedding` stamps the host clock where upstream's loop embeds
the token it just drew — after that step's host syncs (`nonzero`, `.item()`), so the stamps follow
the device. `prefill_ms` is the first-token latency of `generate` (request set-up, prefill, head and
the first draw); `decode_ms_per_token` is (last stamp - first stamp) / (stamps - 1), the same
steady-state figure as benchmarks/bench_t2s.py (prefill excluded); `step_median_ms` is the median
single step. Each figure is the median over `--repeats` runs, after one untimed run that captures
the CUDA graph.

Inputs: by default the ones benchmarks/bench_t2s.py draws (`numpy.random.default_rng(seed)`:
phone ids in [0, phoneme_vocab), BERT features standard normal, prompt codes in [0, EOS)); at seed 0
with 60 phones and 150 codes they are identical to its. `--save-inputs X.npz` writes them with keys
`phone_ids` (int64, S_text), `bert` (float32, 1024 x S_text), `prompt_tokens` (int64, S_prompt);
`--inputs X.npz` reads such a file back, so our side can decode the identical prompt.

On the CPU (`--device cpu`) the CUDA graph cannot run (graphs are CUDA-only, and the runner's
constructor puts a tensor on CUDA); the script then runs the same upstream loop eagerly
(`use_cuda_graph=False`, mode `eager`), which is also available on CUDA as a baseline
(`--modes graph eager`). `--check` only imports the upstream module, loads the checkpoint into it
(strict key matching) and checks that every tensor arrived; it runs on any machine with torch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
SMOKE_GPT = Path("moyoyo/GPT_weights/doubao-mixed.ckpt")
UPSTREAM_FILES = ("AR/__init__.py", "AR/models/__init__.py", "AR/models/t2s_model_cudagraph.py",
                  "AR/models/embedding_cudagraph.py", "AR/models/structs_cudagraph.py")


# ---------------------------------------------------------------------------------------- set-up
def upstream_root(folder: Path) -> Path:
    """The folder holding upstream's `AR` package (`DIR/GPT_SoVITS` as exported, or DIR itself)."""
    for cand in (folder / "GPT_SoVITS", folder):
        if (cand / "AR/models/t2s_model_cudagraph.py").is_file():
            return cand
    raise SystemExit(f"--upstream {folder}: no AR/models/t2s_model_cudagraph.py under it (or its GPT_SoVITS/); "
                     "export upstream's files there first (see this script's docstring)")


def git_blob_sha(path: Path) -> str:
    """The hash git gives the file's content, to tie the measured file to the upstream commit."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def import_upstream(folder: Path):
    """Import upstream's cudagraph module from `folder` (first on sys.path) and make sure it is that copy."""
    root = upstream_root(folder)
    for name in [m for m in sys.modules if m == "AR" or m.startswith("AR.")]:
        del sys.modules[name]  # another GPT-SoVITS (the oracle's) may have put its own AR there
    sys.path.insert(0, str(root))
    import AR.models.structs_cudagraph as structs
    import AR.models.t2s_model_cudagraph as cg
    if Path(cg.__file__).resolve() != (root / "AR/models/t2s_model_cudagraph.py").resolve():
        raise SystemExit(f"imported {cg.__file__}, not the copy under {root}")
    commit_file = folder / "COMMIT"
    info = {
        "dir": str(folder),
        "commit": commit_file.read_text().strip() if commit_file.is_file() else None,
        "blobs": {f: git_blob_sha(root / f) for f in UPSTREAM_FILES if (root / f).is_file()},
    }
    return cg, structs, info


def find_ckpt(args) -> Path:
    if args.ckpt:
        return args.ckpt
    model_dir = args.model_dir
    if model_dir is None:
        raise SystemExit("give --ckpt or --model-dir")
    if args.build_smoke and not (model_dir / "smoke.json").is_file():
        sys.path.insert(0, str(ROOT))
        from dora_primespeech_mlx.smoke import build_smoke_model_dir  # numpy only, no mlx

        t0 = time.perf_counter()
        build_smoke_model_dir(model_dir)
        print(f"built the smoke model dir {model_dir} in {time.perf_counter() - t0:.1f} s", flush=True)
    if (model_dir / SMOKE_GPT).is_file():
        return model_dir / SMOKE_GPT
    found = sorted(p for p in model_dir.rglob("*.ckpt") if not p.is_symlink())
    if len(found) != 1:
        raise SystemExit(f"--model-dir {model_dir}: expected {SMOKE_GPT} or exactly one .ckpt, found {len(found)}"
                         + ("" if args.build_smoke else " (add --build-smoke to build the smoke voice there)"))
    return found[0]


def make_inputs(args, model_cfg: dict) -> tuple[dict[str, np.ndarray], dict]:
    if args.inputs:
        data = np.load(args.inputs)
        names = ("phone_ids", "bert", "prompt_tokens") if "phone_ids" in data else ("phones", "bert", "prompt")
        arrays = dict(zip(("phone_ids", "bert", "prompt_tokens"), (np.asarray(data[n]) for n in names)))
        source = {"source": str(args.inputs)}
    else:
        # drawn in the order and ranges benchmarks/bench_t2s.py uses: the same arrays at the same seed
        rng = np.random.default_rng(args.seed)
        phones = rng.integers(0, model_cfg["phoneme_vocab_size"], args.phones)
        bert = rng.standard_normal((1024, args.phones)).astype(np.float32)
        prompt = rng.integers(0, model_cfg["EOS"], args.prompt)
        arrays = {"phone_ids": phones.astype(np.int64), "bert": bert, "prompt_tokens": prompt.astype(np.int64)}
        source = {"source": "generated", "seed": args.seed}
    arrays["phone_ids"] = arrays["phone_ids"].astype(np.int64).reshape(-1)
    arrays["prompt_tokens"] = arrays["prompt_tokens"].astype(np.int64).reshape(-1)
    arrays["bert"] = arrays["bert"].astype(np.float32)
    if arrays["bert"].shape != (1024, arrays["phone_ids"].size):
        raise SystemExit(f"bert is {arrays['bert'].shape}; expected (1024, {arrays['phone_ids'].size})")
    if args.save_inputs:
        np.savez(args.save_inputs, **arrays)
    return arrays, {**source, "phone_ids": int(arrays["phone_ids"].size),
                    "prompt_tokens": int(arrays["prompt_tokens"].size)}


# ----------------------------------------------------------------------------------------- check
def check(cg, ckpt_path: Path) -> dict:
    """Strict load through upstream's own loader, then every checkpoint tensor found in the model."""
    import torch

    decoder = cg.CUDAGraphRunner.load_decoder(str(ckpt_path))  # load_state_dict(strict=True) inside
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    weights = ckpt["weight"]
    params = decoder.state_dict()

    def fingerprint(t):
        t = t.detach().double()
        return tuple(t.shape), round(float(t.sum()), 6), round(float((t * t).sum()), 6)

    want = sorted(fingerprint(t) for t in weights.values())
    have = sorted(fingerprint(t.to(weights[next(iter(weights))].dtype)) for t in params.values())
    mismatched = sum(a != b for a, b in zip(want, have)) + abs(len(want) - len(have))
    probe_key = "model.h.layers.0.self_attn.in_proj_weight"
    probe_ok = probe_key in weights and torch.equal(
        decoder.h.layers[0].attention.in_proj.weight.detach().to(weights[probe_key].dtype), weights[probe_key])
    out = {
        "strict_load": "ok",
        "ckpt_tensors": len(weights),
        "model_tensors": len(params),
        "ckpt_dtype": str(next(iter(weights.values())).dtype),
        "parameters": int(sum(p.numel() for p in decoder.parameters())),
        "tensors_not_matched": int(mismatched),
        f"{probe_key} == h.layers.0.attention.in_proj.weight": bool(probe_ok),
        "config_model": ckpt["config"]["model"],
    }
    if mismatched or not probe_ok:
        raise SystemExit(f"check failed: {json.dumps(out)}")
    return out


# ------------------------------------------------------------------------------------------- run
def mask_eos(torch, decoder) -> None:
    """Give the output head a -inf bias at EOS: the sampler and the argmax stop test never see it."""
    head = decoder.ar_predict_layer
    masked = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        masked.weight.copy_(head.weight)
        masked.bias.zero_()
        masked.bias[decoder.EOS] = float("-inf")
    decoder.ar_predict_layer = masked.to(head.weight.device, head.weight.dtype)


def build_runner(cg, torch, decoder, device, dtype, mode: str):
    if device.type == "cuda":
        return cg.CUDAGraphRunner(decoder, device, dtype)
    # The runner's constructor puts one tensor on CUDA. Without CUDA, give it the state its eager
    # loop reads (the graph buffers are only used when a graph is captured, which never happens here).
    assert mode == "eager"
    runner = cg.CUDAGraphRunner.__new__(cg.CUDAGraphRunner)
    runner.device, runner.dtype = device, dtype
    runner.decoder_model = decoder.to(device, dtype)
    runner.graph = None
    runner.kv_cache = runner.decoder_model.init_cache(1)
    runner.input_pos = torch.tensor([0], dtype=torch.int32, device=device)
    return runner


def one_run(torch, structs, runner, inputs, n_tokens: int, mode: str, seed: int, stamps: list, device, dtype):
    dev_inputs = {
        "x": [torch.from_numpy(inputs["phone_ids"]).to(device)],
        "x_lens": torch.tensor([inputs["phone_ids"].size], device=device),
        "prompts": torch.from_numpy(inputs["prompt_tokens"])[None].to(device),
        "bert_feature": [torch.from_numpy(inputs["bert"]).to(device, dtype)],
    }
    request = structs.T2SRequest(**dev_inputs, valid_length=1, top_k=5, top_p=1, temperature=1.0,
                                 repetition_penalty=1.35, early_stop_num=n_tokens - 1,
                                 use_cuda_graph=(mode == "graph"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(seed)
    stamps.clear()
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        result = runner.generate(request)
    sync()
    t_end = time.perf_counter()
    if result.status != "Success":
        raise RuntimeError(f"upstream generate failed: {result.exception}\n{result.traceback}")
    tokens = result.result[0]
    out = {"tokens": int(tokens.numel()), "total_ms": 1000 * (t_end - t0)}
    if stamps:
        out["prefill_ms"] = 1000 * (stamps[0] - t0)
    if len(stamps) >= 2:
        steps = np.diff(np.array(stamps)) * 1000
        out["decode_ms_per_token"] = float((stamps[-1] - stamps[0]) * 1000 / (len(stamps) - 1))
        out["step_median_ms"] = float(np.median(steps))
        out["step_p90_ms"] = float(np.percentile(steps, 90))
        out["step_max_ms"] = float(steps.max())
    out["first_tokens"] = tokens[:8].tolist()
    return out


def bench(cg, structs, torch, ckpt, inputs, args, device, dtype_name: str, mode: str) -> list[dict]:
    dtype = getattr(torch, DTYPES[dtype_name])
    t0 = time.perf_counter()
    decoder = cg.CUDAGraphRunner.load_decoder(str(ckpt))
    if args.eos == "mask":
        mask_eos(torch, decoder)
    runner = build_runner(cg, torch, decoder, device, dtype, mode)
    load_s = time.perf_counter() - t0
    stamps: list[float] = []
    hook = runner.decoder_model.ar_audio_embedding.register_forward_pre_hook(
        lambda module, args_: stamps.append(time.perf_counter()))
    rows = []
    try:
        for n in args.tokens:
            # untimed: CUDA context, kernels, and (first call only) the graph capture at step 1
            warm = one_run(torch, structs, runner, inputs, min(n, 32), mode, args.seed, stamps, device, dtype)
            runs = [one_run(torch, structs, runner, inputs, n, mode, args.seed + r, stamps, device, dtype)
                    for r in range(args.repeats)]
            med = {k: statistics.median(r[k] for r in runs)
                   for k in ("prefill_ms", "decode_ms_per_token", "step_median_ms", "total_ms") if k in runs[0]}
            row = {"dtype": dtype_name, "mode": mode, "tokens_requested": n,
                   "tokens": [r["tokens"] for r in runs], **med,
                   "tokens_per_s": 1000 / med["decode_ms_per_token"] if "decode_ms_per_token" in med else None,
                   "load_s": load_s, "warmup_total_ms": warm["total_ms"], "per_repeat": runs}
            row["short"] = any(r["tokens"] != n for r in runs)
            rows.append(row)
            print(f"{dtype_name:>5} {mode:>6} N={n:<5} prefill {med.get('prefill_ms', math.nan):8.2f} ms   "
                  f"decode {med.get('decode_ms_per_token', math.nan):7.3f} ms/token "
                  f"(step median {med.get('step_median_ms', math.nan):.3f})   "
                  f"{row['tokens_per_s'] or math.nan:7.1f} tokens/s   tokens {row['tokens']}", flush=True)
    finally:
        hook.remove()
        del runner, decoder
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", type=Path, required=True, help="the exported upstream folder (.gpu/upstream)")
    ap.add_argument("--model-dir", type=Path, help="a smoke model dir (its GPT .ckpt is used)")
    ap.add_argument("--build-smoke", action="store_true", help="build the smoke voice at --model-dir if absent")
    ap.add_argument("--ckpt", type=Path, help="a GPT .ckpt instead of --model-dir")
    ap.add_argument("--tokens", type=int, nargs="+", default=[500], help="tokens per run (each count timed)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    ap.add_argument("--dtype", nargs="+", choices=tuple(DTYPES), default=["fp32", "fp16"],
                    help="upstream's web UI runs fp16 on CUDA (is_half); our reference is fp32")
    ap.add_argument("--modes", nargs="+", choices=("graph", "eager"), default=None,
                    help="graph: CUDA graph (upstream's path; CUDA only); eager: the same loop without it. "
                         "Default: graph on cuda, eager on cpu")
    ap.add_argument("--eos", choices=("rare", "mask"), default="rare",
                    help="rare: weights untouched (the smoke GPT makes EOS rare); mask: -inf head bias at EOS")
    ap.add_argument("--allow-tf32", action="store_true", help="let fp32 matmuls use TF32 (torch's default: off)")
    ap.add_argument("--tqdm", choices=("on", "off"), default="on",
                    help="upstream's loop draws a tqdm bar on stderr (on: as shipped)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--phones", type=int, default=60, help="generated inputs: phone ids (S_text)")
    ap.add_argument("--prompt", type=int, default=150, help="generated inputs: prompt codes (S_prompt)")
    ap.add_argument("--inputs", type=Path, help="read phone_ids/bert/prompt_tokens from this .npz")
    ap.add_argument("--save-inputs", type=Path, help="write the inputs used to this .npz")
    ap.add_argument("--check", action="store_true", help="import + strict load + tensor check only")
    ap.add_argument("--json", type=Path, help="write the report here")
    args = ap.parse_args(argv)

    if args.tqdm == "off":
        os.environ["TQDM_DISABLE"] = "1"  # read by tqdm when the bar is created
    import torch

    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device_name)
    modes = args.modes or (["graph"] if device.type == "cuda" else ["eager"])
    if not args.check:
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no CUDA device")
        if device.type != "cuda" and "graph" in modes:
            raise SystemExit("upstream's CUDA-graph T2S needs CUDA: torch.cuda.CUDAGraph only exists there and "
                             "CUDAGraphRunner.__init__ puts input_pos on CUDA. On the CPU run '--modes eager' "
                             "(upstream's same loop without the graph), or '--check'.")
    torch.backends.cuda.matmul.allow_tf32 = args.allow_tf32

    cg, structs, up_info = import_upstream(args.upstream)
    ckpt = find_ckpt(args)
    model_cfg = torch.load(ckpt, map_location="cpu", weights_only=False)["config"]["model"]
    inputs, input_info = make_inputs(args, model_cfg)
    report = {
        "script": "tools/oracle/bench_t2s_cudagraph_torch.py",
        "upstream": up_info,
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "python": platform.python_version(),
        "device": device.type,
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(),
        "allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "ckpt": str(ckpt), "inputs": input_info,
        "sampling": {"top_k": 5, "top_p": 1, "temperature": 1.0, "repetition_penalty": 1.35, "batch_size": 1},
        "eos": args.eos, "tqdm": args.tqdm,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(f"upstream {up_info['commit']}  torch {torch.__version__}  device {report['gpu'] or 'cpu'}  "
          f"ckpt {ckpt}  inputs {input_info}", flush=True)

    status = 0
    if args.check:
        report["check"] = check(cg, ckpt)
        print("check:", json.dumps(report["check"]), flush=True)
    else:
        longest = max(args.tokens)
        if min(args.tokens) < 3 or longest > 1500:
            raise SystemExit("--tokens: each count in [3, 1500] (upstream's loop stops at 1500 steps)")
        if inputs["phone_ids"].size + inputs["prompt_tokens"].size + longest > 2500:
            raise SystemExit("text + prompt + tokens exceed upstream's KV cache (2500 positions)")
        report["runs"] = []
        for dtype_name in args.dtype:
            for mode in modes:
                report["runs"].extend(bench(cg, structs, torch, ckpt, inputs, args, device, dtype_name, mode))
        short = [f"{r['dtype']}/{r['mode']}/N={r['tokens_requested']}: {r['tokens']}" for r in report["runs"]
                 if r["short"]]
        if short:
            print("EOS came before the requested count in: " + "; ".join(short)
                  + " (the decode counts differ from a fixed-length run; use --eos mask)", file=sys.stderr)
            status = 1
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
