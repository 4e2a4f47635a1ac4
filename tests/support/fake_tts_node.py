"""`dora-primespeech-mlx` with a stand-in engine: the real node (node.py's loop, node_service.py's
protocol, dora's send path) in a real dataflow, without loading models.

For the checks that are about Dora, not synthesis (which outputs a dataflow declares, which dora-rs
runs it), so each dora line can be tried in seconds. The stand-in speaks 0.1 s of a quiet tone per
four characters, as one chunk per sentence would arrive.
"""

from __future__ import annotations

import os
import time

import numpy as np

from dora_primespeech_mlx import node
from dora_primespeech_mlx.options import AudioChunk
from dora_primespeech_mlx.voices import VoiceRegistry


class ToneEngine:
    sample_rate = 32000
    backend = "tone (test stand-in, no MLX)"

    def __init__(self, config) -> None:
        self.registry = VoiceRegistry(config.model_dir)

    def prepare_voice(self, voice):
        time.sleep(float(os.environ.get("TONE_PREPARE_S", "0")))  # a voice that takes a while, as a real one does
        return voice.id

    def synthesize_stream(self, text, voice, options, *, streaming=True, is_cancelled=None):
        pieces = max(1, len(text) // 4)
        t = np.arange(3200, dtype=np.float32) / self.sample_rate
        tone = (0.1 * np.sin(2 * np.pi * 220.0 * t)).astype(np.float32)
        for i in range(pieces):
            yield AudioChunk(tone, self.sample_rate, sentence_index=0, chunk_index=i, is_final=i == pieces - 1)

    def cancel(self) -> None:
        pass


if __name__ == "__main__":
    node.make_engine = ToneEngine
    node.main()
