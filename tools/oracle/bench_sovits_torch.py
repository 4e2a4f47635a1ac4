"""PyTorch side of benchmarks/bench_sovits.py: upstream's SynthesizerTrn decode on the same inputs.

Runs in the oracle venv. Loads the SoVITS `.pth` as a user would (fp16 -> fp32, `enc_q` deleted),
then times one `decode` per input set, split by forward hooks into enc_p / flow / HiFi-GAN and
HiFi-GAN's stages (torch on CPU is synchronous, so hook times are exact). Prints one JSON object.

Usage: python bench_sovits_torch.py SOVITS.pth INPUTS.npz NAME [NAME ...]
INPUTS.npz holds `spec` (1, 1025, F) and, per NAME, `NAME_codes` (1, 1, N) and `NAME_phones` (1, S).
"""

import json
import os
import sys
import time
from collections import defaultdict

import GPT_SoVITS  # noqa: F401  (puts its folder on sys.path for module/*)
import numpy as np
import torch


from upstream_sovits import SynthesizerTrn, load_sovits  # noqa: E402


def timed_modules(sov: SynthesizerTrn) -> dict[str, torch.nn.Module]:
    mods = {"enc_p": sov.enc_p, "flow": sov.flow, "hifigan": sov.dec, "hifigan.conv_pre": sov.dec.conv_pre,
            "hifigan.conv_post": sov.dec.conv_post}
    n_k = sov.dec.num_kernels
    for i, up in enumerate(sov.dec.ups):
        mods[f"hifigan.ups.{i}"] = up
        for j in range(n_k):
            mods[f"hifigan.resblocks.{i}.{j}"] = sov.dec.resblocks[i * n_k + j]
    return mods


def main() -> None:
    sovits_path, inputs_path, *names = sys.argv[1:]
    device = os.environ.get("ORACLE_TORCH_DEVICE", "cpu")  # "cuda" on the GPU machine
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sov = load_sovits(sovits_path).to(device)
    inp = np.load(inputs_path)
    spec = torch.from_numpy(inp["spec"]).float().to(device)
    times: dict[str, float] = defaultdict(float)
    starts: dict[str, float] = {}

    # hooks must return None (a pre-hook's value would replace the inputs); synchronize around each
    # part so per-stage times are real on a GPU too
    def start(name: str) -> None:
        sync()
        starts[name] = time.perf_counter()

    def stop(name: str) -> None:
        sync()
        times[name] += time.perf_counter() - starts[name]

    for name, mod in timed_modules(sov).items():
        mod.register_forward_pre_hook(lambda m, a, n=name: start(n))
        mod.register_forward_hook(lambda m, a, o, n=name: stop(n))
    out = {"torch": torch.__version__, "device": device, "threads": torch.get_num_threads(), "runs": {}}
    with torch.no_grad():
        ge, _ = sov.build_decode_condition([spec])
        # warm-up on a short input (first-call allocations), as the MLX side warms up too
        sov.decode(torch.from_numpy(inp[f"{names[0]}_codes"][:, :, :5]).to(device),
                   torch.from_numpy(inp[f"{names[0]}_phones"]).to(device), [spec], noise_scale=0.5, ge=ge)
        for name in names:
            codes = torch.from_numpy(inp[f"{name}_codes"]).to(device)
            phones = torch.from_numpy(inp[f"{name}_phones"]).to(device)
            times.clear()
            sync()
            t0 = time.perf_counter()
            audio = sov.decode(codes, phones, [spec], noise_scale=0.5, ge=ge)
            sync()
            total = time.perf_counter() - t0
            seconds = audio.shape[-1] / 32000
            stages = {k: 1000 * v for k, v in times.items()}
            out["runs"][name] = {"audio_s": seconds, "total_ms": 1000 * total,
                                 "ms_per_audio_s": 1000 * total / seconds, "stages_ms": stages}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
