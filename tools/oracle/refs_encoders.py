"""Reference-audio references from upstream: CNHubert + `SynthesizerTrn.extract_latent` on a waveform.

Runs ONLY with the oracle python (tools/oracle/oracle_env.py). Loads the fixture voice the way
GPT-SoVITS does (`HubertModel.from_pretrained` on the HF folder, the SoVITS `.pth` through
`torch.load`), then runs `_set_prompt_semantic`'s graph on the given 16 kHz waveform (already
padded with the 9600 zeros):

    python refs_encoders.py MOYOYO_DIR WAV16K_PADDED.npy OUT.npz

OUT.npz: `hubert_last_hidden` (1, 768, T) float32 and `prompt_codes` (1, 1, T//2) int64.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

import GPT_SoVITS  # noqa: F401  (puts its folder on sys.path: `module`)
from module.models import SynthesizerTrn  # noqa: E402


class HParams:
    """Unpickling target for the `.pth`'s `utils.HParams` config (the packaged `utils` imports PyAV)."""

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def items(self):
        return self.__dict__.items()


HParams.__module__ = "utils"
sys.modules["utils"] = type(sys)("utils")
sys.modules["utils"].HParams = HParams


def main(argv: list[str]) -> int:
    moyoyo, wav_path, out = Path(argv[1]), Path(argv[2]), Path(argv[3])
    from transformers import HubertModel

    torch.set_grad_enabled(False)
    hubert = HubertModel.from_pretrained(str(moyoyo / "chinese-hubert-base"), local_files_only=True).float().eval()
    ckpt = torch.load(moyoyo / "SoVITS_weights" / "doubao-mixed.pth", map_location="cpu", weights_only=False)
    hps = ckpt["config"]
    sov = SynthesizerTrn(hps.data.filter_length // 2 + 1, hps.train.segment_size // hps.data.hop_length,
                         n_speakers=hps.data.n_speakers, **dict(hps.model.items()))
    missing, _unexpected = sov.load_state_dict(ckpt["weight"], strict=False)
    assert all(k.startswith("enc_q.") for k in missing), missing
    sov = sov.float().eval()
    wav = torch.from_numpy(np.load(wav_path).astype(np.float32))
    hidden = hubert(wav[None])["last_hidden_state"].transpose(1, 2)
    codes = sov.extract_latent(hidden)
    np.savez(out, hubert_last_hidden=hidden.numpy(), prompt_codes=codes.numpy().astype(np.int64))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
