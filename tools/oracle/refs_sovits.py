"""Extra SoVITS references computed from the fixture's `.pth` file itself (oracle venv only).

refs.npz is computed by build_fixtures.py from the in-memory model, whose codebook (a buffer) is
not rounded to fp16 while the file stores it in fp16; intermediate tensors (m_p, logs_p, z) then
differ from what the file's weights give by ~1.5e-4 of their peak. This script loads the file the
way a user would (fp16 -> fp32) and records what upstream computes from it, for several lengths:
latents for 50 (speed 1, 1.1, noise 0.5), 100 and 400 codes; waveforms at noise 0 for 10, 100 and
400 codes (`audio_codes{N}`, the 400-code one is 16 s of audio).

Usage (oracle python): python refs_sovits.py FIXTURE_DIR OUT.npz
"""

from __future__ import annotations

import sys
from pathlib import Path

import GPT_SoVITS  # noqa: F401  (puts its folder on sys.path for module/*)
import numpy as np
import torch


from upstream_sovits import load_sovits  # noqa: E402


def main() -> None:
    fixture_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    sov = load_sovits(fixture_dir / "model_dir/moyoyo/SoVITS_weights/doubao-mixed.pth")
    refs = np.load(fixture_dir / "refs.npz")
    codes50 = torch.from_numpy(refs["in_codes"])
    phones = torch.from_numpy(refs["in_phones_target"])
    spec = torch.from_numpy(refs["spec_eps1e6"])
    rng = np.random.default_rng(4321)
    codes400 = torch.from_numpy(rng.integers(0, 1024, size=(1, 1, 400)))
    phones120 = torch.from_numpy(rng.integers(0, 732, size=(1, 120)))
    out_refs: dict[str, np.ndarray] = {"in_codes400": codes400.numpy(), "in_phones120": phones120.numpy()}

    def latent(codes, text, *, speed=1.0, noise_scale=0.0, noise=None, tag=""):
        captured = {}
        h1 = sov.enc_p.register_forward_hook(lambda m, i, o: captured.update(m_p=o[1].clone(), logs_p=o[2].clone()))
        original = sov._sample_decode_noise_like
        if noise is not None:
            sov._sample_decode_noise_like = lambda *a, **k: noise
        try:
            z, *_ = sov.prepare_decode_latent(codes, text, [spec], noise_scale=noise_scale, speed=speed)
        finally:
            sov._sample_decode_noise_like = original
            h1.remove()
        out_refs[f"m_p{tag}"] = captured["m_p"].numpy()
        out_refs[f"logs_p{tag}"] = captured["logs_p"].numpy()
        out_refs[f"z{tag}"] = z.numpy()

    with torch.no_grad():
        ge, _ = sov.build_decode_condition([spec])
        out_refs["ge"] = ge.numpy()
        latent(codes50, phones)
        latent(codes50, phones, speed=1.1, tag="_speed1p1")
        latent(codes50, phones, noise_scale=0.5, noise=torch.from_numpy(refs["sov_noise_seed233333"]), tag="_noise0p5")
        latent(torch.from_numpy(refs["t2s_greedy_tokens"])[None, None], phones, tag="_codes100")
        latent(codes400, phones120, tag="_codes400")
        out_refs["audio_codes10"] = sov.decode(codes50[:, :, :10], phones, [spec], noise_scale=0.0).numpy()
        codes100 = torch.from_numpy(refs["t2s_greedy_tokens"])[None, None]
        out_refs["audio_codes100"] = sov.decode(codes100, phones, [spec], noise_scale=0.0).numpy()
        out_refs["audio_codes400"] = sov.decode(codes400, phones120, [spec], noise_scale=0.0).numpy()
    np.savez(out, **out_refs)


if __name__ == "__main__":
    main()
