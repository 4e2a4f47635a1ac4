"""A Dora node that stands in for mofa-studio's UI widgets and Python helpers in test dataflows.

    FLOW_ROLE=driver    sends texts lane by lane (FLOW_PLAN, a JSON file) and records what arrives
    FLOW_ROLE=player    records what arrives; answers each `audio_<who>` input with `audio_complete`
                        as mofa-dora-bridge's audio player does (one per audio message it receives)
    FLOW_ROLE=recorder  only records

A driver lane is one output port with its texts: the first is sent at start, each next one only after
the lane's `advance` event arrived (an input id, and for `audio_complete` the `participant` in its
metadata): mofa's conference segmenter releases a participant's next segment on the player's
`audio_complete`, the TTS app's user types the next prompt after hearing the last one. `metadata` is
"none" (the prompt-input bridge sends none) or "segmenter" (session_id, question_id, session_status
as dora-text-segmenter sends them). Everything received goes to FLOW_OUT/<FLOW_NAME>.json, rewritten
after each event, so a timed-out run still leaves its record. Times: `t` from the node's start,
`at` wall-clock (comparable between nodes). A plan's `linger_s` keeps a finished driver listening
that long (inputs other than the pacing one may still be on their way).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pyarrow as pa
from dora import Node


def describe(event: dict, t0: float) -> dict:
    """What a test needs of an input event: id, arrival time, metadata (and its types), payload."""
    meta = {k: v for k, v in (event.get("metadata") or {}).items() if k != "timestamp"}
    value = event["value"]
    record = {"input": event["id"], "t": round(time.monotonic() - t0, 3), "at": time.time(), "metadata": meta,
              "metadata_types": {k: type(v).__name__ for k, v in meta.items()}, "arrow_type": str(value.type)}
    if pa.types.is_list(value.type) or pa.types.is_floating(value.type):
        samples = value[0].values if pa.types.is_list(value.type) else value
        array = samples.to_numpy(zero_copy_only=False)
        record["samples"] = int(array.size)
        record["peak"] = float(abs(array).max()) if array.size else 0.0
    else:
        record["value"] = value.to_pylist()
    return record


class Recorder:
    def __init__(self) -> None:
        self.name = os.environ.get("FLOW_NAME", "node")
        self.path = Path(os.environ["FLOW_OUT"]) / f"{self.name}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.t0 = time.monotonic()
        self.received: list[dict] = []
        self.sent: list[dict] = []

    def save(self, **extra) -> None:
        body = {"node": self.name, "received": self.received, "sent": self.sent, **extra}
        self.path.write_text(json.dumps(body, ensure_ascii=False, indent=1, default=str), encoding="utf-8")


def segmenter_metadata(lane: dict, index: int) -> dict:
    who = lane.get("participant", lane["output"])
    return {"session_id": f"{who}-session", "question_id": lane.get("question_id", 1),
            "session_status": "ended" if index == len(lane["texts"]) - 1 else "started"}


def drive(node: Node, rec: Recorder) -> None:
    plan = json.loads(Path(os.environ["FLOW_PLAN"]).read_text(encoding="utf-8"))
    lanes = plan["lanes"]
    position = [0] * len(lanes)
    deadline = time.monotonic() + float(plan.get("timeout_s", 900))

    def send(k: int) -> None:
        lane = lanes[k]
        text = lane["texts"][position[k]]
        meta = segmenter_metadata(lane, position[k]) if lane.get("metadata") == "segmenter" else {}
        node.send_output(lane["output"], pa.array([text]), meta)
        rec.sent.append({"lane": k, "output": lane["output"], "index": position[k], "text": text, "metadata": meta,
                         "t": round(time.monotonic() - rec.t0, 3), "at": time.time()})

    for k in range(len(lanes)):
        send(k)
    rec.save()
    while any(position[k] < len(lane["texts"]) for k, lane in enumerate(lanes)) and time.monotonic() < deadline:
        event = node.next(timeout=0.5)
        if event is None:
            break
        if event["type"] != "INPUT":
            continue
        record = describe(event, rec.t0)
        rec.received.append(record)
        for k, lane in enumerate(lanes):
            advance = lane["advance"]
            if position[k] >= len(lane["texts"]) or event["id"] != advance["input"]:
                continue
            if "participant" in advance and record["metadata"].get("participant") != advance["participant"]:
                continue
            position[k] += 1
            if position[k] < len(lane["texts"]):
                send(k)
        rec.save()
    finished = all(position[k] >= len(lane["texts"]) for k, lane in enumerate(lanes))
    linger_end = time.monotonic() + float(plan.get("linger_s", 0))  # what other inputs still bring
    while finished and time.monotonic() < linger_end:
        event = node.next(timeout=0.2)
        if event is None:
            break
        if event["type"] == "INPUT":
            rec.received.append(describe(event, rec.t0))
    rec.save(finished=finished)


def listen(node: Node, rec: Recorder, answer_audio: bool) -> None:
    for event in node:
        if event["type"] != "INPUT":
            continue
        record = describe(event, rec.t0)
        rec.received.append(record)
        if answer_audio and event["id"].startswith("audio_"):
            participant = event["id"][len("audio_"):]
            meta = {"participant": participant}
            for key in ("question_id", "session_status"):  # the bridge passes these on as strings
                if key in record["metadata"]:
                    meta[key] = str(record["metadata"][key])
            node.send_output("audio_complete", pa.array(["received"]), meta)
            rec.sent.append({"output": "audio_complete", "metadata": meta, "t": record["t"]})
        rec.save()
    rec.save(finished=True)


def main() -> None:
    role = os.environ.get("FLOW_ROLE", "recorder")
    node = Node()
    rec = Recorder()
    if role == "driver":
        drive(node, rec)
    else:
        listen(node, rec, answer_audio=role == "player")


if __name__ == "__main__":
    main()
