"""Dora node that throws hostile traffic at the TTS node, then checks it still speaks.

HOSTILE_PLAN (JSON) holds `burst`: a list of `{"port": "text"|"control", "payload": str}` sent as
fast as possible (texts numbered by `question_id`); then `storm_texts` (a long text, huge numbers)
followed, once the node is busy, by `reset_storm` resets; then `final`: a normal text. Everything received is written to
HOSTILE_OUT/record.json (rewritten as it goes, so a timeout still leaves a record).
With HOSTILE_STOP_MARK set, the driver instead sends `final`, writes that file once the node reports
`busy`, and keeps listening until Dora stops it (the test sends the stop).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pyarrow as pa
from dora import Node


def main() -> None:
    plan = json.loads(Path(os.environ["HOSTILE_PLAN"]).read_text(encoding="utf-8"))
    out = Path(os.environ["HOSTILE_OUT"])
    stop_mark = os.environ.get("HOSTILE_STOP_MARK")
    node = Node()
    record: dict = {"completions": {}, "audio": {}, "logs": [], "statuses": [], "events_after_stop": 0}
    t0 = time.monotonic()

    def save() -> None:
        (out / "record.json").write_text(json.dumps(record, ensure_ascii=False, indent=1))

    def handle(event) -> None:
        if event["type"] != "INPUT":
            return
        meta = event.get("metadata") or {}
        qid = str(meta.get("question_id"))
        if event["id"] == "segment_complete":
            record["completions"].setdefault(qid, []).append(
                {"status": event["value"].to_pylist()[0], **{k: str(v) for k, v in meta.items() if k != "timestamp"}})
        elif event["id"] == "audio":
            record["audio"].setdefault(qid, []).append(len(event["value"][0].values))
        elif event["id"] == "log":
            record["logs"].append(event["value"].to_pylist()[0])
        elif event["id"] == "status":
            record["statuses"].append(event["value"].to_pylist()[0])

    def wait_for(predicate, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if predicate():
                return True
            event = node.next(timeout=0.05)
            if event is None:
                return predicate()
            handle(event)
        return predicate()

    wait_for(lambda: "ready" in record["statuses"] or "error" in record["statuses"], 900)
    if stop_mark:
        node.send_output("text", pa.array([plan["final"]]), {"question_id": "final"})
        wait_for(lambda: "busy" in record["statuses"], 300)
        Path(stop_mark).write_text("busy")
        while True:  # until Dora stops the dataflow
            event = node.next(timeout=1.0)
            if event is None or event["type"] == "STOP":
                break
            handle(event)
        save()
        return

    # 1. the burst: hostile texts (none of which should make speech) with a control flood between them
    texts = 0
    for item in plan["burst"]:
        if item["port"] == "text":
            # invalid UTF-8 (a lone surrogate, as an LLM's broken output) can only travel as bytes
            value = pa.array([bytes.fromhex(item["hex"])]) if "hex" in item else pa.array([item["payload"]])
            node.send_output("text", value, {"question_id": texts, "session_status": "started"})
            texts += 1
        else:
            node.send_output("control", pa.array([item["payload"]]), {})
    record["burst_texts"] = texts
    record["burst_sent_s"] = round(time.monotonic() - t0, 3)
    wait_for(lambda: all(str(i) in record["completions"] for i in range(texts)), 900)
    save()
    # 2. a reset storm while a long text and huge numbers are being synthesised or queued (Dora does
    # not order events across inputs, so the resets go out once the node is busy with the first)
    for j, text in enumerate(plan["storm_texts"]):
        node.send_output("text", pa.array([text]), {"question_id": f"storm{j}"})
    record["statuses"].clear()
    wait_for(lambda: "busy" in record["statuses"], 300)
    wait_for(lambda: False, plan.get("settle_s", 2.0))
    for _ in range(plan.get("reset_storm", 0)):
        node.send_output("control", pa.array(["reset"]), {})
    wait_for(lambda: all(f"storm{j}" in record["completions"] for j in range(len(plan["storm_texts"]))), 600)
    save()
    # 3. a normal text must still be spoken
    node.send_output("text", pa.array([plan["final"]]), {"question_id": "final", "session_status": "started"})
    wait_for(lambda: "final" in record["completions"], 900)
    record["total_s"] = round(time.monotonic() - t0, 3)
    save()


if __name__ == "__main__":
    main()
