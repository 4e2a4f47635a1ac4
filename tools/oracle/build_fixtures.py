"""Build an oracle model directory and reference outputs with the upstream PyTorch implementation.

Runs ONLY inside the oracle virtualenv (torch + transformers + gpt-sovits-cpufast, see
tools/oracle/setup_venv.py); the MLX package and its tests never import torch, they read the files
written here:

    OUT/model_dir/moyoyo/{GPT_weights,SoVITS_weights,ref_audios,chinese-hubert-base,
                          chinese-roberta-wwm-ext-large}/...   (the layout users have)
    OUT/refs.npz          reference inputs and outputs of every stage (fp32)
    OUT/reader_refs.json  dtype, shape and sha256 of every tensor as torch.load sees it
    OUT/manifest.json     versions, seed, timings, sanity figures

Random weights are made non-degenerate (distinct layers, non-identity flows, weight_g != ||v||,
random codebook, scaled residuals) so that parity tests can fail. Weights are rounded to fp16
before any reference is computed, because the files store fp16.

Usage: python build_fixtures.py OUT [--seed N] [--voice-only]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
import wave
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

import GPT_SoVITS  # noqa: F401  (puts its folder on sys.path for AR/module/text)

PKG_DIR = Path(GPT_SoVITS.__file__).resolve().parent

# The t2s decoder builds a torchmetrics accuracy for training; inference does not need it.
import AR.models.t2s_model as _t2s_model  # noqa: E402

_t2s_model._build_multiclass_accuracy_for_training = lambda *a, **k: None

from AR.models.t2s_lightning_module import Text2SemanticLightningModule  # noqa: E402
from module.models import SynthesizerTrn  # noqa: E402

# Doubao's file names (primespeech_interface.md 3.1): the smoke voice stands in for it.
GPT_FILE = "GPT_weights/doubao-mixed.ckpt"
SOVITS_FILE = "SoVITS_weights/doubao-mixed.pth"
REF_FILE = "ref_audios/doubao_ref_mix_new.wav"
# upstream my_save writes via "<time.time()>.pth", so the zip's folder is that stem, not "archive"
SAVE_STEM = "1725955666.654321"


class HParams:
    """Same pickle stream as GPT-SoVITS utils.HParams (GLOBAL utils HParams + __dict__ state)."""

    def __init__(self, **kwargs):
        for k, v in kwargs.items():
            setattr(self, k, HParams(**v) if isinstance(v, dict) else v)

    def __getitem__(self, key):
        return getattr(self, key)

    def keys(self):
        return self.__dict__.keys()

    def items(self):
        return self.__dict__.items()


HParams.__module__ = "utils"
_utils_mod = type(sys)("utils")
_utils_mod.HParams = HParams
sys.modules["utils"] = _utils_mod


def save_like_upstream(obj, dest: Path) -> None:
    """torch.save through a temp file named like upstream's, so the zip folder is not 'archive'."""
    tmp = dest.parent / f"{SAVE_STEM}.pth"
    torch.save(obj, tmp)
    shutil.move(tmp, dest)


def round_fp16_(module: torch.nn.Module) -> None:
    """Round every float parameter and buffer (e.g. the VQ codebook) to what the fp16 file holds."""
    with torch.no_grad():
        for t in list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]:
            t.copy_(t.half().float())


def perturb_(t: torch.Tensor, scale: float, gen: torch.Generator) -> None:
    t.add_(torch.randn(t.shape, generator=gen) * scale)


def distinctify_norms_and_biases(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Noise on biases and LayerNorm parameters, which default to 0/1 and hide mistakes."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                perturb_(p, 0.05, gen)
            elif p.ndim == 1 and ("norm" in name.lower() or name.endswith("gamma")):
                perturb_(p, 0.1, gen)
            elif name.endswith(("beta",)):
                perturb_(p, 0.05, gen)
            elif name.endswith(("weight_g", "original0")):
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))


# ---------------------------------------------------------------------------------------- GPT


def gpt_config() -> dict:
    import yaml

    with open(PKG_DIR / "configs" / "s1longer-v2.yaml") as f:
        config = yaml.safe_load(f)
    # keys the webui / s1_train add before saving
    config["train"].update({"if_save_latest": True, "if_save_every_weights": True,
                            "half_weights_save_dir": "GPT_weights_v2", "exp_name": "doubao-mixed"})
    config["pretrained_s1"] = "GPT_SoVITS/pretrained_models/gsv-v2final-pretrained/s1bert25hz-5kh-longer-epoch=12-step=369668.ckpt"
    config["train_semantic_path"] = "logs/doubao-mixed/6-name2semantic.tsv"
    config["train_phoneme_path"] = "logs/doubao-mixed/2-name2text.txt"
    config["output_dir"] = "logs/doubao-mixed/logs_s1_v2"
    return config


def build_gpt(config: dict, gen: torch.Generator):
    gpt = Text2SemanticLightningModule(config, "****", is_train=False)
    dec = gpt.model
    with torch.no_grad():
        # TransformerEncoder deep-copies one layer: redraw each layer so all 24 differ.
        for layer in dec.h.layers:
            for name, p in layer.named_parameters():
                if p.ndim >= 2:
                    bound = float(p.abs().max())
                    p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)
            layer.self_attn.out_proj.weight.mul_(0.2)
            layer.linear2.weight.mul_(0.2)
        dec.ar_text_position.alpha.mul_(1 + 0.2 * torch.randn(1, generator=gen))
        dec.ar_audio_position.alpha.mul_(1 + 0.2 * torch.randn(1, generator=gen))
        distinctify_norms_and_biases(dec, gen)
        # keep EOS rare so the greedy reference runs its full 100 steps (real voices stop on EOS)
        dec.ar_predict_layer.weight[dec.EOS].mul_(0.1)
    round_fp16_(gpt)
    gpt.eval()
    dec.rebuild_t2s_transformer()
    return gpt


def gpt_references(dec, phones, bert, prompt, refs: dict) -> dict:
    with torch.no_grad():
        x = dec.ar_text_embedding(phones) + dec.bert_proj(bert.transpose(1, 2))
        x = dec.ar_text_position(x)
        y_pos = dec.ar_audio_position(dec.ar_audio_embedding(prompt))
        xy_pos = torch.cat([x, y_pos], 1)
        sx, sy = x.shape[1], y_pos.shape[1]
        s = sx + sy
        mask = torch.zeros(s, s, dtype=torch.bool)
        mask[:sx, sx:] = True  # text does not see audio
        mask[sx:, sx:] = torch.triu(torch.ones(sy, sy, dtype=torch.bool), 1)  # audio is causal
        hidden, *_ = dec.t2s_transformer.process_prompt(xy_pos, mask[None, None].expand(1, dec.num_head, s, s), 1, None, True)
        refs["t2s_xy_pos"] = xy_pos.numpy()
        refs["t2s_prefill_hidden"] = hidden.numpy()
        refs["t2s_prefill_logits"] = dec.ar_predict_layer(hidden).numpy()

    step_logits = []
    hook = dec.ar_predict_layer.register_forward_hook(lambda m, i, o: step_logits.append(o.detach().clone()))
    try:
        with torch.no_grad():
            torch.manual_seed(233333)
            y, idx = next(dec.infer_panel_naive(phones, torch.tensor([phones.shape[1]]), prompt, bert, top_k=1,
                                                top_p=1, early_stop_num=99, temperature=1, repetition_penalty=1.35))
    finally:
        hook.remove()
    new_tokens = y[0, prompt.shape[1]:].numpy()
    refs["t2s_greedy_tokens"] = new_tokens.astype(np.int64)
    refs["t2s_step_logits_raw"] = torch.stack([l[0] for l in step_logits], 0)[None].numpy()
    raw = refs["t2s_step_logits_raw"][0]
    top2 = np.sort(raw[:, :1024], axis=-1)[:, -2:]
    return {"greedy_idx": int(idx), "greedy_n": int(len(new_tokens)), "greedy_distinct": int(len(set(new_tokens.tolist()))),
            "min_top1_top2_gap": float((top2[:, 1] - top2[:, 0]).min())}


# ------------------------------------------------------------------------------------- SoVITS


def sovits_hparams() -> HParams:
    with open(PKG_DIR / "configs" / "s2.json") as f:
        hps = json.load(f)
    hps["model"]["version"] = "v2"
    hps["version"] = "v2"
    hps["name"] = "doubao-mixed"
    hps["save_weight_dir"] = "SoVITS_weights_v2"
    hps["data"]["exp_dir"] = "logs/doubao-mixed"
    hps["train"].update({"pretrained_s2G": "GPT_SoVITS/pretrained_models/gsv-v2final-pretrained/s2G2333k.pth",
                         "pretrained_s2D": "GPT_SoVITS/pretrained_models/gsv-v2final-pretrained/s2D2333k.pth",
                         "if_save_latest": True, "if_save_every_weights": True, "save_every_epoch": 4,
                         "gpu_numbers": "0"})
    hps["pretrain"] = None
    hps["resume_step"] = None
    return HParams(**hps)


def build_sovits(hps: HParams, gen: torch.Generator):
    model_kwargs = dict(hps.model.items())
    sov = SynthesizerTrn(hps.data.filter_length // 2 + 1, hps.train.segment_size // hps.data.hop_length,
                         n_speakers=hps.data.n_speakers, **model_kwargs)
    with torch.no_grad():
        cb = sov.quantizer.vq.layers[0]._codebook
        cb.embed.copy_(torch.randn(cb.embed.shape, generator=gen))
        cb.embed_avg.copy_(cb.embed)
        cb.cluster_size.fill_(1.0)
        cb.inited.fill_(1.0)
        for name, p in sov.named_parameters():
            # flows' `post` starts at zero (identity flow); give every zero tensor a random value
            if p.ndim >= 2 and float(p.abs().max()) == 0.0:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        distinctify_norms_and_biases(sov, gen)
        # A random HiFi-GAN is dominated by its biases and barely depends on its input; make the
        # waveform follow z (so waveform parity tests can fail) and reach a speech-like level.
        for name, p in sov.dec.named_parameters():
            if name.endswith("bias"):
                p.mul_(0.1)
        sov.dec.conv_pre.weight.mul_(10.0)
        sov.dec.conv_post.weight.mul_(20.0)
    round_fp16_(sov)
    sov.eval()
    return sov


def spectrogram_2024(wav: torch.Tensor) -> torch.Tensor:
    """dora-primespeech's spectrogram: reflect pad, STFT 2048/640/2048 hann, sqrt(|X|^2 + 1e-6)."""
    pad = (2048 - 640) // 2
    y = torch.nn.functional.pad(wav.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
    spec = torch.stft(y, 2048, hop_length=640, win_length=2048, window=torch.hann_window(2048), center=False,
                      pad_mode="reflect", normalized=False, onesided=True, return_complex=True)
    spec = torch.view_as_real(spec)
    return torch.sqrt(spec.pow(2).sum(-1) + 1e-6)


def sovits_references(sov, codes, phones_target, spec, greedy_tokens, refs: dict) -> None:
    captured = {}
    hooks = [
        sov.ref_enc.register_forward_hook(lambda m, i, o: captured.__setitem__("ge", o.detach().clone())),
        sov.enc_p.register_forward_hook(lambda m, i, o: captured.update(m_p=o[1].detach().clone(), logs_p=o[2].detach().clone())),
        sov.dec.register_forward_pre_hook(lambda m, i: captured.__setitem__("z", i[0].detach().clone())),
    ]
    with torch.no_grad():
        refs["sov_audio"] = sov.decode(codes, phones_target, [spec], noise_scale=0.0, speed=1.0).numpy()
        for h in hooks:
            h.remove()
        refs["sov_ge"] = captured["ge"].numpy()
        refs["sov_m_p"] = captured["m_p"].numpy()
        refs["sov_logs_p"] = captured["logs_p"].numpy()
        refs["sov_z"] = captured["z"].numpy()
        refs["sov_audio_speed1p1"] = sov.decode(codes, phones_target, [spec], noise_scale=0.0, speed=1.1).numpy()

        torch.manual_seed(233333)
        noise = torch.randn(captured["m_p"].shape)
        original = sov._sample_decode_noise_like
        sov._sample_decode_noise_like = lambda m_p, *a, **k: noise
        try:
            refs["sov_audio_noise0p5_seed233333"] = sov.decode(codes, phones_target, [spec], noise_scale=0.5, speed=1.0).numpy()
        finally:
            sov._sample_decode_noise_like = original
        refs["sov_noise_seed233333"] = noise.numpy()
        greedy = torch.from_numpy(greedy_tokens)[None, None]
        refs["sov_audio_greedy_tokens"] = sov.decode(greedy, phones_target, [spec], noise_scale=0.0, speed=1.0).numpy()


# ----------------------------------------------------------------------------------- encoders


def write_hf_bin(model: torch.nn.Module, folder: Path, drop: tuple[str, ...] = ()) -> None:
    """Save like transformers 4.30 did: fp16 pytorch_model.bin with legacy weight_g/weight_v names."""
    sd = OrderedDict()
    for key, value in model.state_dict().items():
        if key in drop:
            continue
        key = key.replace(".parametrizations.weight.original0", ".weight_g").replace(
            ".parametrizations.weight.original1", ".weight_v")
        sd[key] = value.half() if value.is_floating_point() else value
    torch.save(sd, folder / "pytorch_model.bin")


def build_hubert(folder: Path, gen: torch.Generator):
    from transformers import HubertConfig, HubertModel

    src = PKG_DIR / "pretrained_models" / "chinese-hubert-base"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(src / name, folder / name)
    with open(src / "config.json") as f:
        cfg = HubertConfig(**json.load(f))
    model = HubertModel(cfg)
    with torch.no_grad():
        distinctify_norms_and_biases(model, gen)
        model.masked_spec_embed.uniform_(generator=gen)
    round_fp16_(model)
    model.eval()
    write_hf_bin(model, folder)
    return model


def build_bert(folder: Path, gen: torch.Generator):
    from transformers import BertConfig, BertForMaskedLM

    src = PKG_DIR / "pretrained_models" / "chinese-roberta-wwm-ext-large"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(src / name, folder / name)
    with open(src / "config.json") as f:
        cfg = BertConfig(**json.load(f))
    model = BertForMaskedLM(cfg)
    with torch.no_grad():
        distinctify_norms_and_biases(model, gen)
    round_fp16_(model)
    model.eval()
    # the decoder weight is tied to the word embeddings and stored once in real files
    write_hf_bin(model, folder, drop=("cls.predictions.decoder.weight",))
    return model


def write_wav_pcm16(path: Path, audio: np.ndarray, rate: int) -> None:
    pcm = np.clip(np.round(audio * 32767.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def synthetic_voice(seconds: float, rate: int, rng: np.random.Generator) -> np.ndarray:
    """A speech-like test signal: gliding harmonics under a syllable-rate envelope, plus noise."""
    t = np.arange(int(seconds * rate)) / rate
    f0 = 140 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 4.0 * t)) ** 2 / 4
    return (0.3 * voiced * envelope + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


# ------------------------------------------------------------------------------------------ main


def tensor_digest(sd) -> dict:
    out = {}
    for k, v in sd.items():
        arr = v.contiguous().numpy() if v.dtype != torch.bfloat16 else v.float().numpy()
        out[k] = [str(arr.dtype), list(arr.shape), hashlib.sha256(arr.tobytes()).hexdigest()]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    out: Path = args.out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    moyoyo = tmp / "model_dir" / "moyoyo"
    for sub in ("GPT_weights", "SoVITS_weights", "ref_audios"):
        (moyoyo / sub).mkdir(parents=True)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    timings, manifest, refs = {}, {}, {}

    t0 = time.perf_counter()
    config = gpt_config()
    gpt = build_gpt(config, gen)
    save_like_upstream({"weight": OrderedDict((k, v.half()) for k, v in gpt.state_dict().items()),
                        "config": config, "info": "GPT-e15"}, moyoyo / GPT_FILE)
    timings["gpt_build_save"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    hps = sovits_hparams()
    sov = build_sovits(hps, gen)
    weight = {k: v.half() for k, v in sov.state_dict().items() if "enc_q" not in k}
    save_like_upstream(OrderedDict(weight=weight, config=hps, info="96epoch_5376iteration"), moyoyo / SOVITS_FILE)
    timings["sovits_build_save"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    hubert = build_hubert(moyoyo / "chinese-hubert-base", gen)
    bert = build_bert(moyoyo / "chinese-roberta-wwm-ext-large", gen)
    timings["encoders_build_save"] = time.perf_counter() - t0

    # ---- inputs (shapes as oracle.md 3.5)
    n_prompt_text, n_target = 12, 24
    phones = torch.from_numpy(rng.integers(0, 732, size=(1, n_prompt_text + n_target))).long()
    bert_feat = torch.from_numpy(rng.standard_normal((1, 1024, phones.shape[1])).astype(np.float32))
    bert_feat[:, :, -8:] = 0.0  # the last 8 phones are "English": BERT zeros
    prompt = torch.from_numpy(rng.integers(0, 1024, size=(1, 50))).long()
    ref32k = synthetic_voice(3.6, 32000, rng)
    write_wav_pcm16(moyoyo / REF_FILE, ref32k, 32000)
    wav32k = torch.from_numpy(synthetic_voice(3.0, 32000, rng))[None]
    wav16k = synthetic_voice(3.0, 16000, rng)
    wav16k_padded = np.concatenate([wav16k, np.zeros(9600, np.float32)])
    refs.update(in_phones=phones.numpy(), in_phones_target=phones[:, n_prompt_text:].numpy(), in_bert=bert_feat.numpy(),
                in_prompt=prompt.numpy(), in_codes=prompt[None].numpy(), in_wav32k=wav32k.numpy(),
                in_wav16k_padded=wav16k_padded)

    t0 = time.perf_counter()
    manifest["gpt"] = gpt_references(gpt.model, phones, bert_feat, prompt, refs)
    timings["gpt_refs"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    with torch.no_grad():
        spec = spectrogram_2024(wav32k)
    refs["spec_eps1e6"] = spec.numpy()
    sovits_references(sov, prompt[None], phones[:, n_prompt_text:], spec, refs["t2s_greedy_tokens"], refs)
    timings["sovits_refs"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    with torch.no_grad():
        hidden = hubert(torch.from_numpy(wav16k_padded)[None])["last_hidden_state"].transpose(1, 2)
        refs["hubert_last_hidden"] = hidden.numpy()
        refs["prompt_codes_from_hubert"] = sov.extract_latent(hidden).numpy()
        # "你好,世界." as the tokenizer sees it; word2ph of its phones (oracle.md 7)
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(moyoyo / "chinese-roberta-wwm-ext-large" / "tokenizer.json"))
        ids = tok.encode("你好,世界.").ids
        refs["bert_input_ids"] = np.asarray([ids], np.int64)
        hs = bert(torch.tensor([ids]), output_hidden_states=True)["hidden_states"]
        hm3 = hs[-3][0][1:-1]
        refs["bert_hidden_m3"] = hm3.numpy()
        word2ph = [2, 2, 1, 2, 2, 1]
        refs["bert_word2ph"] = np.asarray(word2ph, np.int64)
        refs["bert_phone_level"] = torch.cat([hm3[i].repeat(n, 1) for i, n in enumerate(word2ph)], 0).T.numpy()
    timings["encoder_refs"] = time.perf_counter() - t0

    np.savez(tmp / "refs.npz", **{k: np.asarray(v) for k, v in refs.items()})

    t0 = time.perf_counter()
    reader_refs = {}
    for rel in (GPT_FILE, SOVITS_FILE, "chinese-hubert-base/pytorch_model.bin", "chinese-roberta-wwm-ext-large/pytorch_model.bin"):
        obj = torch.load(moyoyo / rel, map_location="cpu", weights_only=False)
        sd = obj["weight"] if "weight" in obj and isinstance(obj.get("weight"), dict) else obj
        entry = {"tensors": tensor_digest(sd), "top_level": list(obj.keys()) if "weight" in obj else None}
        if "config" in obj:
            cfg = obj["config"]
            entry["config"] = json.loads(json.dumps(cfg, default=lambda o: o.__dict__))
            entry["info"] = obj["info"]
        reader_refs[rel] = entry
    (tmp / "reader_refs.json").write_text(json.dumps(reader_refs))
    timings["reader_refs"] = time.perf_counter() - t0

    manifest.update(seed=args.seed, torch=torch.__version__, timings=timings,
                    files={GPT_FILE: "gpt", SOVITS_FILE: "sovits", REF_FILE: "reference clip"},
                    shapes={k: list(np.asarray(v).shape) for k, v in refs.items()})
    import transformers

    manifest["transformers"] = transformers.__version__
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    (tmp / "model_dir" / "SMOKE_VOICE_NOT_SPEECH.txt").write_text(
        "Random weights in the real GPT-SoVITS v2 layout, built for tests and the demo.\n"
        "Audio synthesised from this directory is noise, not speech.\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(json.dumps({"out": str(out), "timings": timings, "gpt": manifest["gpt"]}))


if __name__ == "__main__":
    main()
