"""Load a SoVITS `.pth` into upstream's SynthesizerTrn as a user's file would load (oracle venv only).

Shared by the oracle scripts that need the upstream decoder on the fixture file.
"""

import sys

import GPT_SoVITS  # noqa: F401  (puts its folder on sys.path for module/*)
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
sys.modules.setdefault("utils", _utils)

from module.models import SynthesizerTrn  # noqa: E402


def load_sovits(path) -> SynthesizerTrn:
    """Upstream model from a `.pth`, fp32, eval mode, without the training-only posterior encoder."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    hps = ckpt["config"]
    sov = SynthesizerTrn(hps.data.filter_length // 2 + 1, hps.train.segment_size // hps.data.hop_length,
                         n_speakers=hps.data.n_speakers, **dict(hps.model.items()))
    del sov.enc_q
    missing, unexpected = sov.load_state_dict({k: v.float() for k, v in ckpt["weight"].items()}, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return sov.eval()
