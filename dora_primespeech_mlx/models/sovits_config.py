"""Config of the SoVITS v2 decoder stage: the checkpoint's hyper-parameters, their sane ranges, and
the tensor sizes they imply (checked against a file before any model is built)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..weights import CheckpointError, check_int, check_int_list, check_state_dict, check_weight_norm_pairs, short_repr
from .base import ModelConfig

__all__ = ["V1_SYMBOLS", "V2_SYMBOLS", "SoVITSConfig"]


# v2 symbol table size (text/symbols2.py); v1 has 322.
V2_SYMBOLS = 732
V1_SYMBOLS = 322


@dataclass
class SoVITSConfig(ModelConfig):
    """Hyper-parameters of a SoVITS v2 checkpoint (`configs/s2.json`, stored in the `.pth`)."""

    inter_channels: int = 192
    hidden_channels: int = 192
    filter_channels: int = 768
    n_heads: int = 2
    n_layers: int = 6
    kernel_size: int = 3
    resblock: str = "1"
    resblock_kernel_sizes: list[int] = field(default_factory=lambda: [3, 7, 11])
    resblock_dilation_sizes: list[list[int]] = field(default_factory=lambda: [[1, 3, 5]] * 3)
    upsample_rates: list[int] = field(default_factory=lambda: [10, 8, 2, 2, 2])
    upsample_initial_channel: int = 512
    upsample_kernel_sizes: list[int] = field(default_factory=lambda: [16, 16, 8, 2, 2])
    gin_channels: int = 512
    semantic_frame_rate: str = "25hz"
    version: str = "v2"
    # data section
    sampling_rate: int = 32000
    filter_length: int = 2048
    hop_length: int = 640
    win_length: int = 2048
    # fixed by the architecture, not stored in s2.json
    n_symbols: int = V2_SYMBOLS
    ssl_dim: int = 768
    codebook_size: int = 1024
    style_bins: int = 704  # v2 feeds only the first 704 spectrogram bins to ref_enc
    window_size: int = 4
    mrte_channels: int = 512
    mrte_heads: int = 4

    def __post_init__(self) -> None:
        self._check_ranges()
        self.spec_channels = self.filter_length // 2 + 1
        self.upsample_factor = int(np.prod(self.upsample_rates))

    def _check_ranges(self) -> None:
        """Sane ranges (the real v2 values are the defaults): a hostile config must not size anything."""
        w = "SoVITS config"
        for name, hi in (("inter_channels", 4096), ("hidden_channels", 4096), ("filter_channels", 16384),
                         ("gin_channels", 4096), ("ssl_dim", 4096), ("mrte_channels", 4096),
                         ("n_symbols", 65536), ("codebook_size", 65536)):
            check_int(w, name, getattr(self, name), 1, hi)
        check_int(w, "n_heads", self.n_heads, 1, 64)
        check_int(w, "mrte_heads", self.mrte_heads, 1, 64)
        check_int(w, "n_layers", self.n_layers, 1, 64)
        check_int(w, "kernel_size", self.kernel_size, 1, 31)
        check_int(w, "window_size", self.window_size, 1, 64)
        if self.hidden_channels % self.n_heads or self.mrte_channels % self.mrte_heads:
            raise ValueError(f"{w}: hidden_channels/mrte_channels must be multiples of n_heads/mrte_heads")
        if self.resblock not in ("1", "2"):
            raise ValueError(f"{w}: resblock={short_repr(self.resblock)} must be '1' or '2'")
        kernels = check_int_list(w, "resblock_kernel_sizes", self.resblock_kernel_sizes, 1, 63, max_len=8)
        dilations = self.resblock_dilation_sizes
        if not (isinstance(dilations, (list, tuple)) and len(dilations) == len(kernels)):
            raise ValueError(f"{w}: resblock_dilation_sizes needs one list per resblock kernel size")
        for d in dilations:
            check_int_list(w, "resblock_dilation_sizes[i]", d, 1, 64, max_len=8)
        rates = check_int_list(w, "upsample_rates", self.upsample_rates, 1, 64, max_len=8)
        check_int_list(w, "upsample_kernel_sizes", self.upsample_kernel_sizes, 1, 128, min_len=len(rates),
                       max_len=len(rates))
        check_int(w, "upsample_initial_channel", self.upsample_initial_channel, 2 ** len(rates), 8192)
        if self.semantic_frame_rate not in ("25hz", "50hz"):
            raise ValueError(f"{w}: semantic_frame_rate={short_repr(self.semantic_frame_rate)} must be '25hz' or '50hz'")
        if not isinstance(self.version, str):
            raise ValueError(f"{w}: version must be a string")
        check_int(w, "sampling_rate", self.sampling_rate, 1000, 192000)
        check_int(w, "filter_length", self.filter_length, 16, 16384)
        check_int(w, "hop_length", self.hop_length, 1, self.filter_length)
        check_int(w, "win_length", self.win_length, 1, self.filter_length)
        check_int(w, "style_bins", self.style_bins, 1, self.filter_length // 2 + 1)

    def check_weights(self, weights: dict[str, Any], source: str | Path) -> None:
        """Raise `CheckpointError` unless the tensors (raw `.pth` or sanitized cache names) have the sizes
        this config implies, and weight-norm pairs fit; runs before the model is built."""
        weights = check_state_dict(source, weights)
        check_weight_norm_pairs(source, {k: v for k, v in weights.items() if not k.startswith("enc_q.")}, dim=0)
        h, n_up, uic = self.hidden_channels, len(self.upsample_rates), self.upsample_initial_channel
        want: dict[tuple[str, ...], tuple[int, ...]] = {
            ("enc_p.text_embedding.weight",): (self.n_symbols, h),
            ("enc_p.ssl_proj.bias",): (h,),
            ("enc_p.proj.bias",): (2 * self.inter_channels,),
            (f"enc_p.encoder_text.attn_layers.{self.n_layers - 1}.conv_q.bias",): (h,),
            ("enc_p.encoder_text.ffn_layers.0.conv_1.bias",): (self.filter_channels,),
            ("enc_p.mrte.c_pre.bias",): (self.mrte_channels,),
            ("dec.conv_pre.bias",): (uic,),
            (f"dec.ups.{n_up - 1}.bias",): (uic // 2 ** n_up,),
            ("ssl_proj.bias",): (self.ssl_dim,),
            ("ref_enc.spectral.0.fc.weight",): (128, self.style_bins),
            ("ref_enc.fc.fc.bias",): (self.gin_channels,),
            ("quantizer.vq.layers.0._codebook.embed", "quantizer.embed"): (self.codebook_size, self.ssl_dim),
        }
        for keys, shape in want.items():
            got = next((weights[k] for k in keys if k in weights), None)
            if got is None or tuple(got.shape) != shape:
                found = "missing" if got is None else f"of shape {tuple(got.shape)}"
                raise CheckpointError(f"{source}: the SoVITS config implies {keys[0]} of shape {shape}, the file's "
                                      f"is {found}; the config does not match the weights (or the file is damaged)")
        for prefix in (f"enc_p.encoder_text.attn_layers.{self.n_layers}.", f"dec.ups.{n_up}."):
            if any(k.startswith(prefix) for k in weights):
                raise CheckpointError(f"{source}: the file holds {prefix}* beyond what the config describes; "
                                      "the config does not match the weights")

    @classmethod
    def select(cls, config: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint's `config` (sections `data`/`model`) or a flat dict, flattened; a top-level
        value overrides a section's, and None values count as absent (the default applies)."""
        flat: dict[str, Any] = {}
        for section in ("data", "model"):
            if isinstance(config.get(section), dict):
                flat.update(config[section])
        flat.update({k: v for k, v in config.items() if not isinstance(v, dict)})
        return {k: v for k, v in flat.items() if v is not None}
