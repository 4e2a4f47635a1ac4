"""Demo recorder: writes each `audio` message to a WAV and every message's metadata to events.json."""

import json
import os
import time
from pathlib import Path

import numpy as np
import soundfile as sf
from dora import Node


def main() -> None:
    out_dir = Path(os.environ.get("DEMO_OUT_DIR", "out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    node = Node()
    events = []
    for event in node:
        if event["type"] != "INPUT":
            continue
        meta = {k: v for k, v in (event.get("metadata") or {}).items() if k != "timestamp"}
        record = {"input": event["id"], "at": time.time(), "metadata": meta,
                  "metadata_types": {k: type(v).__name__ for k, v in meta.items()},
                  "arrow_type": str(event["value"].type)}
        if event["id"] == "audio":
            samples = np.asarray(event["value"][0].values.to_numpy(zero_copy_only=False), dtype=np.float32)
            name = f"{meta.get('question_id', 'x')}_{meta.get('segment_index', 0)}.wav"
            sf.write(out_dir / name, samples, int(meta.get("sample_rate", 32000)), subtype="PCM_16")
            record.update(wav=name, samples=int(samples.size), peak=float(np.abs(samples).max(initial=0.0)))
        else:
            record["value"] = event["value"].to_pylist()
        events.append(record)
        (out_dir / "events.json").write_text(json.dumps(events, ensure_ascii=False, indent=1, default=str))


if __name__ == "__main__":
    main()
