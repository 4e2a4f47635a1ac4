"""Why the engine has one owner thread, shown on the machine at hand (run it on a GPU).

1. The compiled GPT step traced on the main thread, then run on a second thread: with MLX >= 0.31.2
   this raises "There is no Stream(gpu, 0) in current thread" on a GPU (and, with mlx-cpu 0.32.4,
   "Stream(cpu, 0)" on the CPU too; the CPU default is eager decode, which is why CPU runs of the node
   never showed it). 2. The same through the engine: the second thread gets `WrongThreadError` on
   every device, before any MLX work. Prints one line per case; exit 0 when case 2 holds.

    python benchmarks/device/thread_rule.py MODEL_DIR
"""

from __future__ import annotations

import sys
import threading

import mlx.core as mx
import numpy as np


def in_thread(fn):
    box = {}

    def target():
        try:
            box["ok"] = fn()
        except Exception as exc:  # noqa: BLE001 - reported
            box["error"] = f"{type(exc).__name__}: {exc}"

    t = threading.Thread(target=target, name="second-thread")
    t.start()
    t.join()
    return box


def main(model_dir: str) -> int:
    from dora_primespeech_mlx.engine import Engine
    from dora_primespeech_mlx.options import SynthesisOptions, WrongThreadError

    print("device:", mx.default_device())
    engine = Engine(model_dir)
    voice = engine.registry.get("Doubao")
    t2s, _ = engine.voice_models(voice)
    phones = np.arange(1, 12, dtype=np.int64)
    bert = np.zeros((1024, phones.size), np.float32)
    prompt = np.arange(5, 30, dtype=np.int64)
    # 1. raw MLX: a compiled step made here, used there
    list(t2s.decode_steps(phones, bert, prompt, max_new_tokens=3, compile=True))
    box = in_thread(lambda: len(list(t2s.decode_steps(phones, bert, prompt, max_new_tokens=3, compile=True))))
    print("raw MLX, compiled step reused on a second thread:", box.get("error") or f"ran ({box['ok']} steps)")
    # 2. through the engine
    box = in_thread(lambda: engine.synthesize("你好。", voice, SynthesisOptions(max_new_tokens=2)))
    print("engine called from a second thread:", box.get("error") or "ran (rule not enforced!)")
    ok = "error" in box and WrongThreadError.__name__ in box["error"]
    result = engine.synthesize("你好。", voice, SynthesisOptions(max_new_tokens=2))
    print(f"engine on its owner thread: {result.audio.size} samples")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
