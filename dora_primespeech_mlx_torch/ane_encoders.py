"""Neural-Engine-friendly PyTorch re-writes of CNHubert and chinese-roberta-wwm-ext-large.

The layout follows Apple's "Deploying Transformers on the Apple Neural Engine" recipe:

- activations are channels-first `(B, C, 1, S)`: the ANE's native 4-D layout, so no transposes
  between layers and the last axis (sequence) is the one it tiles;
- every Linear is a 1x1 `Conv2d` (same math, a kernel the ANE runs well), conv1d layers are
  `(1, k)` Conv2d;
- LayerNorm normalises over the channel axis (dim 1), which Core ML fuses into one `layer_norm`;
- attention is computed per head with einsum on `(B, Dh, 1, S)` slices instead of a 5-D
  reshape/transpose, and the softmax scale is folded into the query projection;
- padding to an enumerated bucket is masked: a key bias of -1e4 in attention, a masked mean/variance
  in HuBERT's time-wise GroupNorm and zeroed frames before the positional convolution. Every other
  op is per frame, or a conv whose valid outputs only read valid inputs, so the valid frames equal an
  unpadded run.

Weights come from the user's HF folder through the torch-free reader
(`dora_primespeech_mlx.weights`); parameter names mirror the HF keys so loading is a reshape.
Only the layers GPT-SoVITS reads are built: HuBERT's last hidden state, RoBERTa up to layer 22.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dora_primespeech_mlx.weights import CheckpointError, fuse_weight_norm, load_hf_weights, normalize_weight_norm_names

MASK_BIAS = -1e4  # fp16-safe "minus infinity": exp underflows to exactly 0 after the max shift


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; the HF model folder needs its config.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class LayerNormC(nn.Module):
    """LayerNorm over the channel axis of `(B, C, 1, S)`; parameter names as `nn.LayerNorm`."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        xc = x - mean
        var = (xc * xc).mean(dim=1, keepdim=True)
        return xc * torch.rsqrt(var + self.eps) * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def conv1x1(c_in: int, c_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=1, bias=bias)


def split_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_heads: int,
                         key_bias: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention, one head at a time. q, k, v: (B, C, 1, S), q already scaled;
    key_bias: (B, S_k, 1, 1) additive (0 or MASK_BIAS). Returns (B, C, 1, S_q)."""
    dh = q.shape[1] // n_heads
    k_t = k.transpose(1, 3)  # (B, S_k, 1, C): one transpose per layer, not per head
    outs = []
    # both equations have the "nchw,nwhu->nchu" form that Core ML lowers to its native einsum
    for qh, kh, vh in zip(q.split(dh, dim=1), k_t.split(dh, dim=3), v.split(dh, dim=1)):
        w = torch.einsum("bkhc,bchq->bkhq", kh, qh)  # (B, S_k, 1, S_q): keys on the channel axis
        if key_bias is not None:
            w = w + key_bias
        w = w.softmax(dim=1)
        outs.append(torch.einsum("bchk,bkhq->bchq", vh, w))
    return torch.cat(outs, dim=1)


def length_mask(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(1, 1, 1, S) float mask of x's last axis: 1 for the first `valid` positions, 0 after."""
    pos = torch.arange(x.shape[-1], dtype=torch.int32, device=x.device)
    return (pos < valid.to(torch.int32)).to(x.dtype).view(1, 1, 1, -1)


# ------------------------------------------------------------------------------------------ HuBERT


class HubertConvLayer(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, bias: bool, group_norm: bool):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, (1, kernel), stride=(1, stride), bias=bias)
        if group_norm:
            # GroupNorm(C, C): each channel normalised over time -> masked over the valid frames
            self.layer_norm = nn.GroupNorm(c_out, c_out, eps=1e-5)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if hasattr(self, "layer_norm"):
            m = length_mask(x, valid)
            # mean over the padded axis rescaled by S/valid: sums of 30k fp16 values could overflow
            scale = x.shape[-1] / valid.to(x.dtype)
            mean = (x * m).mean(dim=-1, keepdim=True) * scale
            xc = x - mean
            var = (xc * xc * m).mean(dim=-1, keepdim=True) * scale
            x = xc * torch.rsqrt(var + self.layer_norm.eps)
            x = x * self.layer_norm.weight.view(1, -1, 1, 1) + self.layer_norm.bias.view(1, -1, 1, 1)
        return F.gelu(x)


class HubertFeatureEncoder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        dims, kernels, strides = cfg["conv_dim"], cfg["conv_kernel"], cfg["conv_stride"]
        self.kernels, self.strides = list(kernels), list(strides)
        self.conv_layers = nn.ModuleList(
            HubertConvLayer(dims[i - 1] if i else 1, dims[i], kernels[i], strides[i], cfg.get("conv_bias", False),
                            group_norm=i == 0)
            for i in range(len(dims)))

    def forward(self, wav: torch.Tensor, num_samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, 1, 1, N) waveform -> ((1, 512, 1, T) features, valid frame count)."""
        x, valid = wav, num_samples
        for layer, k, s in zip(self.conv_layers, self.kernels, self.strides):
            valid = torch.div(valid - k, s, rounding_mode="floor") + 1  # frames that read only real samples
            x = layer(x, valid)
        return x, valid


class HubertFeatureProjection(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.layer_norm = LayerNormC(cfg["conv_dim"][-1], cfg.get("layer_norm_eps", 1e-5))
        self.projection = conv1x1(cfg["conv_dim"][-1], cfg["hidden_size"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.layer_norm(x))


class HubertPositionalConvEmbedding(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        d, k = cfg["hidden_size"], cfg["num_conv_pos_embeddings"]
        self.conv = nn.Conv2d(d, d, (1, k), padding=(0, k // 2), groups=cfg["num_conv_pos_embedding_groups"])
        self.num_pad_remove = 1 if k % 2 == 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.num_pad_remove:
            y = y[..., : -self.num_pad_remove]
        return F.gelu(y)


class HubertAttention(nn.Module):
    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (conv1x1(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        o = split_head_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.n_heads, key_bias)
        return self.out_proj(o)


class HubertFeedForward(nn.Module):
    def __init__(self, d: int, ffn: int):
        super().__init__()
        self.intermediate_dense = conv1x1(d, ffn)
        self.output_dense = conv1x1(ffn, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_dense(F.gelu(self.intermediate_dense(x)))


class HubertEncoderLayer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        d, eps = cfg["hidden_size"], cfg.get("layer_norm_eps", 1e-5)
        self.attention = HubertAttention(d, cfg["num_attention_heads"])
        self.layer_norm = LayerNormC(d, eps)
        self.feed_forward = HubertFeedForward(d, cfg["intermediate_size"])
        self.final_layer_norm = LayerNormC(d, eps)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        x = self.layer_norm(x + self.attention(x, key_bias))
        return self.final_layer_norm(x + self.feed_forward(x))


class HubertEncoder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.pos_conv_embed = HubertPositionalConvEmbedding(cfg)
        self.layer_norm = LayerNormC(cfg["hidden_size"], cfg.get("layer_norm_eps", 1e-5))
        self.layers = nn.ModuleList(HubertEncoderLayer(cfg) for _ in range(cfg["num_hidden_layers"]))


class HubertANE(nn.Module):
    """CNHubert's last hidden state, `(1, 1, 1, N)` waveform + `(1,)` valid samples -> `(1, 768, 1, T)`.

    Frames past `hubert_frames(num_samples)` are padding and hold garbage; the caller drops them.
    """

    def __init__(self, cfg: dict):
        super().__init__()
        if cfg.get("feat_extract_norm", "group") != "group" or cfg.get("do_stable_layer_norm", False):
            raise ValueError("only the post-norm HuBERT-base layout (feat_extract_norm='group') is supported")
        self.feature_extractor = HubertFeatureEncoder(cfg)
        self.feature_projection = HubertFeatureProjection(cfg)
        self.encoder = HubertEncoder(cfg)

    def forward(self, input_values: torch.Tensor, num_samples: torch.Tensor) -> torch.Tensor:
        feats, valid = self.feature_extractor(input_values, num_samples)
        x = self.feature_projection(feats)  # (1, 768, 1, T)
        m = length_mask(x, valid)
        # zero the padding so the positional conv sees the zeros its own padding would give
        x = x * m
        x = self.encoder.layer_norm(x + self.encoder.pos_conv_embed(x))
        key_bias = ((1.0 - m) * MASK_BIAS).view(1, -1, 1, 1)  # (1, S_k, 1, 1)
        for layer in self.encoder.layers:
            x = layer(x, key_bias)
        return x


# ------------------------------------------------------------------------------------------ RoBERTa


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        d = cfg["hidden_size"]
        self.word_embeddings = nn.Embedding(cfg["vocab_size"], d)
        self.position_embeddings = nn.Embedding(cfg["max_position_embeddings"], d)
        self.token_type_embeddings = nn.Embedding(cfg.get("type_vocab_size", 2), d)
        self.LayerNorm = LayerNormC(d, cfg.get("layer_norm_eps", 1e-12))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        s = input_ids.shape[1]
        # one sentence: token_type 0 everywhere, positions 0..S-1
        x = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0] + self.position_embeddings.weight[:s]
        return self.LayerNorm(x.transpose(1, 2).unsqueeze(2))  # (1, S, D) -> (1, D, 1, S)


class BertSelfAttention(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.query, self.key, self.value = conv1x1(d, d), conv1x1(d, d), conv1x1(d, d)


class BertResidualOutput(nn.Module):
    def __init__(self, d_in: int, d: int, eps: float):
        super().__init__()
        self.dense = conv1x1(d_in, d)
        self.LayerNorm = LayerNormC(d, eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        d = cfg["hidden_size"]
        self.n_heads = cfg["num_attention_heads"]
        self.self = BertSelfAttention(d)
        self.output = BertResidualOutput(d, d, cfg.get("layer_norm_eps", 1e-12))

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        s = self.self
        o = split_head_attention(s.query(x), s.key(x), s.value(x), self.n_heads, key_bias)
        return self.output(o, x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.dense = conv1x1(cfg["hidden_size"], cfg["intermediate_size"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertResidualOutput(cfg["intermediate_size"], cfg["hidden_size"], cfg.get("layer_norm_eps", 1e-12))

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, key_bias)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: dict, n_layers: int):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(n_layers))


class BertANE(nn.Module):
    """RoBERTa `hidden_states[n_layers]`: `(1, S)` ids + `(1,)` valid tokens -> `(1, 1024, 1, S)`.

    GPT-SoVITS reads `hidden_states[-3]`, so `n_layers = num_hidden_layers - 2` (22 of 24).
    """

    def __init__(self, cfg: dict, n_layers: int):
        super().__init__()
        if cfg.get("hidden_act", "gelu") != "gelu" or cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only erf-GELU BERTs with absolute positions are supported")
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg, n_layers)

    def forward(self, input_ids: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids)
        key_bias = ((1.0 - length_mask(x, num_tokens)) * MASK_BIAS).view(1, -1, 1, 1)
        for layer in self.encoder.layer:
            x = layer(x, key_bias)
        return x


# ------------------------------------------------------------------------------------------ loading


def _load_strict(module: nn.Module, weights: dict[str, np.ndarray], folder: Path) -> None:
    """Copy HF tensors into `module` by name, reshaping Linear/Conv1d kernels to Conv2d ones.
    Every parameter must come from the file (HF tensors the module does not use are ignored:
    masked_spec_embed, pooler, MLM head, the layers past the one GPT-SoVITS reads)."""
    state = {}
    for name, target in module.state_dict().items():
        if name not in weights:
            raise CheckpointError(f"{folder}: tensor {name!r} missing; the folder does not hold the expected model")
        value = np.asarray(weights[name], dtype=np.float32)
        if value.shape != tuple(target.shape):
            if value.ndim == 2 and target.ndim == 4:  # Linear (O, I) -> 1x1 conv (O, I, 1, 1)
                value = value[:, :, None, None]
            elif value.ndim == 3 and target.ndim == 4:  # Conv1d (O, I, K) -> (O, I, 1, K)
                value = value[:, :, None, :]
            if value.shape != tuple(target.shape):
                raise CheckpointError(f"{folder}: {name} has shape {value.shape}, expected {tuple(target.shape)}; "
                                      "config.json does not match the weights")
        state[name] = torch.from_numpy(np.ascontiguousarray(value))
    module.load_state_dict(state, strict=True)


def hubert_weights(folder: Path) -> dict[str, np.ndarray]:
    """HF HuBERT state dict with the positional conv's weight norm fused (over dim 2, as HuBERT does)."""
    w = normalize_weight_norm_names(load_hf_weights(folder))
    w = {(k[len("hubert."):] if k.startswith("hubert.") else k): v for k, v in w.items()}
    pos = "encoder.pos_conv_embed.conv"
    if f"{pos}.weight_g" in w:
        w[f"{pos}.weight"] = fuse_weight_norm(w.pop(f"{pos}.weight_g"), w.pop(f"{pos}.weight_v"), dim=2)
    return w


def build_hubert(folder: str | Path) -> HubertANE:
    """HubertANE with the weights of an HF chinese-hubert-base folder, fp32, eval mode."""
    folder = Path(folder)
    cfg = _read_config(folder)
    model = HubertANE(cfg)
    scale = (cfg["hidden_size"] // cfg["num_attention_heads"]) ** -0.5
    _load_strict(model, hubert_weights(folder), folder)
    with torch.no_grad():  # fold 1/sqrt(Dh) into q_proj (weight and bias)
        for layer in model.encoder.layers:
            layer.attention.q_proj.weight.mul_(scale)
            layer.attention.q_proj.bias.mul_(scale)
    return model.eval()


def bert_weights(folder: Path) -> dict[str, np.ndarray]:
    """HF BERT state dict without the `bert.` prefix, LayerNorm gamma/beta renamed."""
    out = {}
    for key, value in load_hf_weights(folder).items():
        key = key[len("bert."):] if key.startswith("bert.") else key
        key = key.replace(".LayerNorm.gamma", ".LayerNorm.weight").replace(".LayerNorm.beta", ".LayerNorm.bias")
        out[key] = value
    return out


def build_bert(folder: str | Path, n_layers: int | None = None) -> BertANE:
    """BertANE with the weights of an HF chinese-roberta-wwm-ext-large folder, fp32, eval mode.

    `n_layers` defaults to `num_hidden_layers - 2` (the `hidden_states[-3]` GPT-SoVITS uses).
    """
    folder = Path(folder)
    cfg = _read_config(folder)
    n = cfg["num_hidden_layers"] - 2 if n_layers is None else n_layers
    model = BertANE(cfg, n)
    _load_strict(model, bert_weights(folder), folder)
    scale = (cfg["hidden_size"] // cfg["num_attention_heads"]) ** -0.5
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.attention.self.query.weight.mul_(scale)
            layer.attention.self.query.bias.mul_(scale)
    return model.eval()
