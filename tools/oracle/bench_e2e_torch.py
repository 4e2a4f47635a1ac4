"""PyTorch side of benchmarks/bench_e2e.py: upstream's pipeline (frontend, BERT, GPT, SoVITS) on one text.

Runs in the oracle venv. The MLX side decides the sentence split and the language segments and
passes them here, so both sides convert the same spans; upstream's language detector cannot run
offline (oracle.md 7). Chinese goes through `clean_text` on the pypinyin path (refs_text.py);
English segments carry the POS tags our tagger gave (nltk's needs downloaded data), as
refs_text_en.py does.

    python bench_e2e_torch.py PAYLOAD.json INPUTS.npz

PAYLOAD.json: {"gpt", "sovits", "hubert_dir", "bert_dir": paths; "tokens": N (GPT steps per sentence);
  "top_k", "top_p", "temperature", "repetition_penalty", "noise_scale", "speed", "seed",
  "fragment_interval"; "prompt_segments": [seg, ...] (the voice's transcript);
  "sentences": [[seg, ...], ...]; "warmup": {"sentences": [[seg, ...]], "tokens": n} | null},
  seg = {"lang": "zh"|"en", "text": str, "tags": [[word, tag], ...] | null}.
INPUTS.npz: `wav16k_padded` (HuBERT input, with upstream's 0.6 s of zeros) and `wav32k` (spectrogram
input), as our reference loader made them (the oracle has no resampler of librosa's quality).

The run mirrors dora-primespeech's batch mode sentence by sentence: frontend and BERT of every
sentence first (upstream's preprocess), then per sentence the GPT (`infer_panel_naive`,
`early_stop_num=N-1`: N tokens unless EOS comes first) and `SynthesizerTrn.decode` at the voice's
speed; every generated token is decoded (upstream's `TTS.run` keeps `pred[-idx:]`, one fewer), so
both sides decode the same number of codes. Each sentence is peak-limited and followed by
`fragment_interval` s of silence. `ORACLE_TORCH_DEVICE=cuda` moves models and tensors to the GPU and
synchronises around every timing. Prints one JSON object (seconds).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import time
from pathlib import Path

T_IMPORT = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent))

# order matters: upstream's folder on sys.path and the `utils` stub first
# isort: off
import numpy as np
import torch

import upstream_sovits  # (stubs upstream's `utils` so the .pth unpickles; loads SynthesizerTrn)
import refs_text  # (imports GPT_SoVITS: its folder goes on sys.path)

import AR.models.t2s_model as _t2s_model

_t2s_model._build_multiclass_accuracy_for_training = lambda *a, **k: None  # training-only metric
from AR.models.t2s_lightning_module import Text2SemanticLightningModule
from module.mel_processing import spectrogram_torch
from transformers import AutoTokenizer, BertForMaskedLM, HubertModel
# isort: on

DEVICE = os.environ.get("ORACLE_TORCH_DEVICE", "cpu")  # "cuda" on the GPU machine
SAMPLE_RATE = 32000


def sync() -> None:
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def now() -> float:
    """A timestamp after all queued GPU work (CUDA launches are asynchronous)."""
    sync()
    return time.perf_counter()


def peak_rss_mb() -> float:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


class Upstream:
    """Upstream's models on DEVICE plus the text frontend, called as GPT-SoVITS calls them."""

    def __init__(self, p: dict):
        refs_text._load_chinese2_pypinyin()
        from text import cleaned_text_to_sequence, english
        from text.cleaner import clean_text

        self._clean_text, self._to_ids, self._english = clean_text, cleaned_text_to_sequence, english
        ckpt = torch.load(p["gpt"], map_location="cpu", weights_only=False)
        gpt = Text2SemanticLightningModule(ckpt["config"], "****", is_train=False)
        gpt.load_state_dict({k: v.float() for k, v in ckpt["weight"].items()})
        gpt.eval().to(DEVICE)
        self.t2s = gpt.model
        self.t2s.rebuild_t2s_transformer()  # fused fast-path weights are plain attributes: rebuild on DEVICE
        self.spec_cfg = torch.load(p["sovits"], map_location="cpu", weights_only=False)["config"].data
        self.sovits = upstream_sovits.load_sovits(p["sovits"]).to(DEVICE)
        self.hubert = HubertModel.from_pretrained(p["hubert_dir"], local_files_only=True).float().eval().to(DEVICE)
        self.tokenizer = AutoTokenizer.from_pretrained(p["bert_dir"], local_files_only=True)
        self.bert = BertForMaskedLM.from_pretrained(p["bert_dir"], local_files_only=True).float().eval().to(DEVICE)

    # ---------------------------------------------------------------- text
    def frontend(self, segments: list[dict]) -> list[tuple[list[int], list[int] | None, str, str]]:
        """clean_text per segment -> (phone ids, word2ph, norm_text, lang)."""
        out = []
        for seg in segments:
            tags = seg.get("tags")
            self._english._pos_tag = None if tags is None else (lambda words, t=tags: [tuple(x) for x in t])
            with contextlib.redirect_stdout(sys.stderr):  # upstream prints from its tone sandhi
                phones, word2ph, norm = self._clean_text(seg["text"], seg["lang"], "v2")
            out.append((list(self._to_ids(phones, "v2")), word2ph, norm, seg["lang"]))
        return out

    def bert_features(self, converted) -> torch.Tensor:
        """(1024, S) features: hidden state -3 repeated per word2ph for Chinese, zeros otherwise."""
        feats = []
        for ids, word2ph, norm, lang in converted:
            if lang == "zh":
                inputs = {k: v.to(DEVICE) for k, v in self.tokenizer(norm, return_tensors="pt").items()}
                hidden = self.bert(**inputs, output_hidden_states=True)["hidden_states"][-3][0][1:-1]
                if len(word2ph) != hidden.shape[0]:
                    raise RuntimeError(f"{norm!r}: {hidden.shape[0]} tokens for {len(word2ph)} characters")
                feats.append(torch.cat([hidden[i].repeat(n, 1) for i, n in enumerate(word2ph)], 0).T)
            else:
                feats.append(torch.zeros((1024, len(ids)), device=DEVICE))
        return torch.cat(feats, dim=1)

    # ---------------------------------------------------------------- voice
    def prepare_voice(self, wav16k_padded: np.ndarray, wav32k: np.ndarray, prompt_segments: list[dict]) -> dict:
        t = {}
        t0 = now()
        hidden = self.hubert(torch.from_numpy(wav16k_padded)[None].to(DEVICE))["last_hidden_state"].transpose(1, 2)
        codes = self.sovits.extract_latent(hidden)[0, 0]  # (P,)
        t1 = now()
        data = self.spec_cfg
        spec = spectrogram_torch(torch.from_numpy(wav32k)[None].to(DEVICE), data.filter_length, data.sampling_rate,
                                 data.hop_length, data.win_length, center=False)
        ge, _ = self.sovits.build_decode_condition([spec])
        t2 = now()
        converted = self.frontend(prompt_segments)
        t3 = now()
        bert = self.bert_features(converted)
        t4 = now()
        t.update(hubert_codes_s=t1 - t0, spectrogram_style_s=t2 - t1, prompt_frontend_s=t3 - t2,
                 prompt_bert_s=t4 - t3, total_s=t4 - t0)
        ids = torch.tensor([i for c in converted for i in c[0]], dtype=torch.long, device=DEVICE)
        return {"codes": codes, "spec": spec, "ge": ge, "phone_ids": ids, "bert": bert, "timings": t,
                "n_codes": int(codes.shape[0]), "n_phones": int(ids.shape[0])}

    # ---------------------------------------------------------------- synthesis
    def synthesize(self, sentences: list[list[dict]], voice: dict, p: dict, tokens: int) -> dict:
        """Whole text, upstream batch order; times in seconds from the start of the call."""
        t_start = now()
        converted = [self.frontend(segs) for segs in sentences]
        t_front = now()
        berts = [self.bert_features(c) for c in converted]
        t_bert = now()
        silence = round(p["fragment_interval"] * SAMPLE_RATE)
        gpt_s, sovits_s, first_audio_s, audio_samples, produced, phones = 0.0, 0.0, None, 0, [], []
        for index, (conv, bert) in enumerate(zip(converted, berts)):
            seed = p["seed"] + index
            ids = torch.tensor([i for c in conv for i in c[0]], dtype=torch.long, device=DEVICE)
            all_ids = torch.cat([voice["phone_ids"], ids])[None]
            all_bert = torch.cat([voice["bert"], bert], dim=1)[None]
            torch.manual_seed(seed)
            t0 = now()
            y, _ = next(self.t2s.infer_panel_naive(
                all_ids, torch.tensor([all_ids.shape[1]], device=DEVICE), voice["codes"][None], all_bert,
                top_k=p["top_k"], top_p=p["top_p"], temperature=p["temperature"],
                repetition_penalty=p["repetition_penalty"], early_stop_num=tokens - 1))
            new = y[:, voice["n_codes"]:]  # every generated token (see the module docstring)
            t1 = now()
            torch.manual_seed(seed)
            audio = self.sovits.decode(new[None], ids[None], [voice["spec"]], noise_scale=p["noise_scale"],
                                       speed=p["speed"], ge=voice["ge"])[0, 0]
            peak = audio.abs().max()
            if peak > 1.0:  # upstream peak-limits each sentence
                audio = audio / peak
            audio = audio.cpu().numpy()
            t2 = now()
            gpt_s += t1 - t0
            sovits_s += t2 - t1
            produced.append(int(new.shape[1]))
            phones.append(int(ids.shape[0]))
            audio_samples += audio.shape[0] + silence
            if first_audio_s is None:
                first_audio_s = t2 - t_start
        total = now() - t_start
        audio_s = audio_samples / SAMPLE_RATE
        return {"total_s": total, "first_sentence_s": first_audio_s, "frontend_s": t_front - t_start,
                "bert_s": t_bert - t_front, "t2s_s": gpt_s, "sovits_s": sovits_s, "tokens": produced,
                "phones": phones,                 "audio_s": audio_s, "rtf": total / audio_s, "sentences": len(sentences)}


def main(argv: list[str]) -> int:
    payload_path, inputs_path = argv[1], argv[2]
    p = json.loads(Path(payload_path).read_text(encoding="utf-8"))
    inp = np.load(inputs_path)
    out: dict = {"torch": torch.__version__, "device": DEVICE, "threads": torch.get_num_threads(),
                 "import_s": time.perf_counter() - T_IMPORT}
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    up = Upstream(p)
    sync()
    out["load_s"] = time.perf_counter() - t0
    if DEVICE.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name()
    voice = up.prepare_voice(inp["wav16k_padded"].astype(np.float32), inp["wav32k"].astype(np.float32),
                             p["prompt_segments"])
    out["voice_prepare"] = voice["timings"]
    out["voice_prepare"].update(prompt_codes=voice["n_codes"], prompt_phones=voice["n_phones"])
    if p.get("warmup"):
        out["warmup"] = up.synthesize(p["warmup"]["sentences"], voice, p, p["warmup"]["tokens"])
    out["run"] = up.synthesize(p["sentences"], voice, p, p["tokens"])
    out["peak_rss_mb"] = peak_rss_mb()
    if DEVICE.startswith("cuda"):
        out["cuda_peak_memory_mb"] = torch.cuda.max_memory_allocated() / 1e6
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
