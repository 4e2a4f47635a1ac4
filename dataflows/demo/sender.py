"""Demo sender: one text at a time from DEMO_TEXTS, the next after the previous `segment_complete`."""

import json
import os
import time
from pathlib import Path

import pyarrow as pa
from dora import Node

TIMEOUT_S = float(os.environ.get("DEMO_TEXT_TIMEOUT", "900"))


def main() -> None:
    texts_file = Path(os.environ.get("DEMO_TEXTS", Path(__file__).with_name("texts.txt")))
    texts = [t.strip() for t in texts_file.read_text(encoding="utf-8").splitlines() if t.strip()]
    out_dir = Path(os.environ.get("DEMO_OUT_DIR", "out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    node = Node()
    sent = []
    for index, text in enumerate(texts):
        sent.append({"question_id": index, "text": text, "sent_at": time.time()})
        node.send_output("text", pa.array([text]), {"question_id": index, "session_status": "started"})
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            event = node.next(timeout=1.0)
            if event is None:
                break
            if event["type"] == "INPUT" and event["id"] == "segment_complete":
                sent[-1]["status"] = event["value"][0].as_py()
                sent[-1]["completed_at"] = time.time()
                break
        else:
            sent[-1]["status"] = "timeout"
    (out_dir / "sent.json").write_text(json.dumps(sent, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
