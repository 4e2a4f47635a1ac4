"""PyTorch side of benchmarks/bench_sovits.py: upstream's SynthesizerTrn decode on the same inputs.

Runs in the oracle venv. Loads the SoVITS `.pth` as a user would (fp16 -> fp32, `enc_q` deleted),
then times one `decode` per input set, split by forward hooks into enc_p / flow / HiFi-GAN and
HiFi-GAN's stages (torch on CPU is synchronous, so hook times are exact). Prints one JSON object.

Usage: python bench_sovits_torch.py SOVITS.pth INPUTS.npz NAME [NAME ...]
INPUTS.npz holds `spec` (1, 1025, F) and, per NAME, `NAME_codes` (1, 1, N) and `NAME_phones` (1, S).
"""

import json
import sys
import time
from collections import defaultdict

import GPT_SoVITS  # noqa: F401  (puts its folder on sys.path for module/*)
import numpy as np
import torch


class HParams:
    """Unpickling target for GPT-SoVITS utils.HParams (attribute bag)."""

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)

    def __getitem__(self, key):
        return getattr(self, key)

    def items(self):
        return self.__dict__.items()


HParams.__module__ = "utils"
_utils = type(sys)("utils")
_utils.HParams = HParams
sys.modules["utils"] = _utils

from module.models import SynthesizerTrn


def load(path: str) -> SynthesizerTrn:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    hps = ckpt["config"]
    sov = SynthesizerTrn(hps.data.filter_length // 2 + 1, hps.train.segment_size // hps.data.hop_length,
                         n_speakers=hps.data.n_speakers, **dict(hps.model.items()))
    del sov.enc_q
    missing, unexpected = sov.load_state_dict({k: v.float() for k, v in ckpt["weight"].items()}, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return sov.eval()


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
    sov = load(sovits_path)
    inp = np.load(inputs_path)
    spec = torch.from_numpy(inp["spec"]).float()
    times: dict[str, float] = defaultdict(float)
    starts: dict[str, float] = {}
    for name, mod in timed_modules(sov).items():
        mod.register_forward_pre_hook(lambda m, a, n=name: starts.__setitem__(n, time.perf_counter()))
        mod.register_forward_hook(lambda m, a, o, n=name: times.__setitem__(n, times[n] + time.perf_counter() - starts[n]))
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "runs": {}}
    with torch.no_grad():
        ge, _ = sov.build_decode_condition([spec])
        # warm-up on a short input (first-call allocations), as the MLX side warms up too
        sov.decode(torch.from_numpy(inp[f"{names[0]}_codes"][:, :, :5]), torch.from_numpy(inp[f"{names[0]}_phones"]),
                   [spec], noise_scale=0.5, ge=ge)
        for name in names:
            codes = torch.from_numpy(inp[f"{name}_codes"])
            phones = torch.from_numpy(inp[f"{name}_phones"])
            times.clear()
            t0 = time.perf_counter()
            audio = sov.decode(codes, phones, [spec], noise_scale=0.5, ge=ge)
            total = time.perf_counter() - t0
            seconds = audio.shape[-1] / 32000
            stages = {k: 1000 * v for k, v in times.items()}
            out["runs"][name] = {"audio_s": seconds, "total_ms": 1000 * total,
                                 "ms_per_audio_s": 1000 * total / seconds, "stages_ms": stages}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
