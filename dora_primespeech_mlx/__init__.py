"""GPT-SoVITS v2 text-to-speech on Apple MLX, with a Dora node that replaces dora-primespeech.

Public API (numpy in, numpy out at every boundary; see docs/api.md):

- `load_t2s(path)`: the text-to-semantic GPT from a `.ckpt` or its converted cache
- `load_sovits(path)`: the SoVITS decoder from a `.pth` or its converted cache
- `load_hubert(dir)`, `load_bert(dir)`: the two pretrained encoders from HF folders
- `dora_primespeech_mlx.text.clean_text`: the text frontend
- `Engine`, `SynthesisOptions`, `AudioChunk`, `AudioResult`, `VoiceRegistry`: synthesis
- `read_torch_file`, `load_hf_weights`: torch-free readers of the original files

Stages are imported lazily so that `import dora_primespeech_mlx` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "Engine": "dora_primespeech_mlx.engine",
    "AudioResult": "dora_primespeech_mlx.engine",
    "VoicePrompt": "dora_primespeech_mlx.engine",
    "SynthesisOptions": "dora_primespeech_mlx.options",
    "AudioChunk": "dora_primespeech_mlx.options",
    "VoiceRegistry": "dora_primespeech_mlx.voices",
    "reference_features": "dora_primespeech_mlx.audio",
    "load_t2s": "dora_primespeech_mlx.models.t2s_io",
    "load_sovits": "dora_primespeech_mlx.models.sovits",
    "load_hubert": "dora_primespeech_mlx.models.hubert",
    "load_bert": "dora_primespeech_mlx.models.bert",
    "read_torch_file": "dora_primespeech_mlx.weights",
    "load_hf_weights": "dora_primespeech_mlx.weights",
    "CheckpointError": "dora_primespeech_mlx.weights",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dora_primespeech_mlx' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
