"""Dora node that drives `dora-primespeech-mlx` through the product check (node_check.py).

Waits for the node's `ready` status, then sends each step of the scenario (NODE_CHECK_PLAN, a JSON
file) one at a time, the next only after the previous `segment_complete` (as mofa's segmenters do),
and records per step: status, first-audio and completion times from the send, audio seconds. A step
with `"reset_after_s"` sends `reset` on `control` that long after the node reports `busy`.
Results go to NODE_CHECK_OUT/results.json.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pyarrow as pa
from dora import Node


def main() -> None:
    plan = json.loads(Path(os.environ["NODE_CHECK_PLAN"]).read_text(encoding="utf-8"))
    out = Path(os.environ["NODE_CHECK_OUT"])
    step_timeout = float(os.environ.get("NODE_CHECK_STEP_TIMEOUT", "900"))
    node = Node()
    t_start = time.perf_counter()
    result: dict = {"steps": [], "logs": [], "statuses": []}

    def record_event(event) -> None:
        if event["id"] == "log":
            result["logs"].append(event["value"].to_pylist()[0])
        elif event["id"] == "status":
            result["statuses"].append([round(time.perf_counter() - t_start, 3), event["value"].to_pylist()[0]])
        elif event["id"] == "audio":
            # dora does not keep the order of different outputs: an audio message can arrive after its
            # text's segment_complete (seen under load on dora-rs 1.1); it still belongs to that step
            qid = event["metadata"].get("question_id")
            if isinstance(qid, int) and 0 <= qid < len(result["steps"]):
                late = result["steps"][qid]
                late["audio_messages"] += 1
                late["audio_s"] = round(late["audio_s"] + len(event["value"][0].values)
                                        / float(event["metadata"].get("sample_rate", 32000)), 3)
                late["late_audio_messages"] = late.get("late_audio_messages", 0) + 1

    # 1. the node loads, prepares its voice and warms up; requests are measured from `ready` on
    deadline = time.monotonic() + float(os.environ.get("NODE_CHECK_READY_TIMEOUT", "1200"))
    ready = None
    while ready is None and time.monotonic() < deadline:
        event = node.next(timeout=1.0)
        if event is None:
            break
        if event["type"] != "INPUT":
            continue
        record_event(event)
        if event["id"] == "status" and event["value"].to_pylist()[0] in ("ready", "error"):
            ready = event["value"].to_pylist()[0]
    result["ready"] = ready
    result["ready_s"] = round(time.perf_counter() - t_start, 3)

    # 2. the scenario, one step at a time
    for index, step in enumerate(plan if ready == "ready" else []):
        meta = {"question_id": index, "session_status": "started"}
        row = {"name": step["name"], "text": step["text"][:60], "status": None, "first_audio_s": None,
               "completion_s": None, "audio_s": 0.0, "audio_messages": 0}
        sent_at = time.perf_counter()
        node.send_output("text", pa.array([step["text"]]), meta)
        reset_at = None
        busy_seen = False
        step_deadline = time.monotonic() + step_timeout
        while time.monotonic() < step_deadline:
            if (step.get("reset_after_s") is not None and busy_seen and reset_at is None
                    and time.perf_counter() - busy_seen >= step["reset_after_s"]):
                node.send_output("control", pa.array(["reset"]), {})
                reset_at = time.perf_counter()
            event = node.next(timeout=0.02)
            if event is None:
                break
            if event["type"] != "INPUT":
                continue
            elapsed = time.perf_counter() - sent_at
            if event["id"] != "audio" or event["metadata"].get("question_id") != index:
                record_event(event)
            if event["id"] == "status" and event["value"].to_pylist()[0] == "busy" and not busy_seen:
                busy_seen = time.perf_counter()
            elif event["id"] == "audio" and event["metadata"].get("question_id") == index:
                samples = event["value"][0].values
                row["audio_messages"] += 1
                row["audio_s"] += len(samples) / float(event["metadata"].get("sample_rate", 32000))
                if row["first_audio_s"] is None:
                    row["first_audio_s"] = round(elapsed, 4)
            elif event["id"] == "segment_complete" and event["metadata"].get("question_id") == index:
                row["status"] = event["value"].to_pylist()[0]
                row["completion_s"] = round(elapsed, 4)
                if "error" in event["metadata"]:
                    row["error"] = str(event["metadata"]["error"])[:300]
                if reset_at is not None:
                    row["reset_to_completion_s"] = round(time.perf_counter() - reset_at, 4)
                break
        else:
            row["status"] = "timeout"
        row["audio_s"] = round(row["audio_s"], 3)
        result["steps"].append(row)
        (out / "results.json").write_text(json.dumps(result, ensure_ascii=False, indent=1))
    # audio still on its way after the last segment_complete (see record_event)
    grace = time.monotonic() + 2.0
    while time.monotonic() < grace:
        event = node.next(timeout=0.1)
        if event is None:
            break
        if event["type"] == "INPUT":
            record_event(event)
    result["total_s"] = round(time.perf_counter() - t_start, 3)
    (out / "results.json").write_text(json.dumps(result, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
