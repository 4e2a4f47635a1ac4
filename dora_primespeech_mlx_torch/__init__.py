"""Conversion-only companion of `dora_primespeech_mlx`: PyTorch code that never runs in the engine.

Needs the `[coreml]` extra (torch + coremltools). The engine reaches this package only through a
subprocess (`dora_primespeech_mlx.coreml.convert_coreml`), so the engine process never imports
torch; that is also why it lives outside the `dora_primespeech_mlx` folder that the import guard
scans.

- `ane_encoders`: Neural-Engine-friendly PyTorch re-writes of CNHubert and RoBERTa, built from the
  user's HF folders with the torch-free reader.
- `coreml_convert`: traces them and writes fp16 `.mlpackage`s (`python -m
  dora_primespeech_mlx_torch.coreml_convert --help`).
"""
