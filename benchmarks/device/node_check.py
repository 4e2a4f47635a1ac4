"""The whole product, as a user runs it: the real `dora-primespeech-mlx` node in a real `dora run`.

    python benchmarks/device/node_check.py --model-dir DIR --out OUT [--max-new-tokens N] [--json F]

A driver node (node_driver.py) waits for the node's `ready`, then sends the demo texts
(dataflows/demo/texts.txt), a `VOICE:` switch, a long text that it resets while the node is busy, a
text after the reset and the first text again, each after the previous `segment_complete`. Prints
per text: status, first-audio and completion time; the first request against its repeat; the node's
start-up time; whether the process exited cleanly (exit 0, no "terminate called", no traceback).
Exit status 1 when a check fails: a text that did not complete, a reset that did not give
`cancelled`, an unclean exit, or (with --max-first-ratio) a first request slower than that many
times its repeat. The model directory may be a smoke voice (`python -m dora_primespeech_mlx.smoke`).

Runs on the CPU (cap tokens: mlx-cpu is slow) and on the GPU machine (benchmarks/device/gpu_node.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
LONG_TEXT = ("从前有一座山，山里有一座庙。庙里住着一个老和尚和一个小和尚。老和尚每天给小和尚讲故事。"
             "故事说的是，从前有一座山，山里有一座庙。小和尚听了一遍又一遍，终于睡着了。"
             "第二天早上，太阳出来了，鸟儿在树上唱歌。小和尚起床以后，又去找老和尚讲故事。")


def plan(reset_after_s: float, only: list[str] | None = None) -> list[dict]:
    texts = [t.strip() for t in (ROOT / "dataflows" / "demo" / "texts.txt").read_text(encoding="utf-8").splitlines()
             if t.strip()]
    steps = [{"name": f"demo {i}", "text": t} for i, t in enumerate(texts)]
    steps += [
        {"name": "voice switch", "text": "VOICE:Luo Xiang|大家好，今天我们聊一聊法律。"},
        {"name": "long + reset", "text": LONG_TEXT, "reset_after_s": reset_after_s, "expect": "cancelled"},
        {"name": "after reset", "text": "重置之后，我还能继续说话。"},
        {"name": "demo 0 again", "text": texts[0]},
    ]
    return steps if not only else [s for s in steps if s["name"] in only]


def dataflow(driver_python: str, node_cmd: str, env: dict[str, str]) -> str:
    node_env = "".join(f"      {k}: {json.dumps(v)}\n" for k, v in env.items())
    return f"""nodes:
  - id: driver
    path: {driver_python}
    args: {HERE / 'node_driver.py'}
    inputs:
      audio: {{source: primespeech/audio, queue_size: 1000}}
      segment_complete: {{source: primespeech/segment_complete, queue_size: 1000}}
      status: {{source: primespeech/status, queue_size: 1000}}
      log: {{source: primespeech/log, queue_size: 1000}}
    outputs: [text, control]
  - id: primespeech
    path: {node_cmd}
    inputs:
      text: {{source: driver/text, queue_size: 1000}}
      control: {{source: driver/control, queue_size: 100}}
    outputs: [audio, segment_complete, status, log]
    env:
{node_env}"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="MAX_NEW_TOKENS of the node (cap on the CPU)")
    ap.add_argument("--reset-after", type=float, default=0.5, help="seconds after `busy` to send reset")
    ap.add_argument("--max-first-ratio", type=float, default=None,
                    help="fail when the first request takes more than this times its repeat (GPU: 1.2)")
    ap.add_argument("--dora", default="dora", help="the dora CLI (must match the node's dora-rs)")
    ap.add_argument("--node", default="dora-primespeech-mlx", help="the node command")
    ap.add_argument("--env", action="append", default=[], help="extra NAME=VALUE for the node")
    ap.add_argument("--steps", default=None, help="comma-separated step names to run (default: all)")
    ap.add_argument("--timeout", type=float, default=3000)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    (out / "run").mkdir(parents=True)
    only = args.steps.split(",") if args.steps else None
    steps_plan = plan(args.reset_after, only)
    (out / "plan.json").write_text(json.dumps(steps_plan, ensure_ascii=False, indent=1))
    node_env = {"PRIMESPEECH_MODEL_DIR": str(args.model_dir.resolve()), "VOICE_NAME": "Doubao",
                "LOG_LEVEL": "INFO"}
    if args.max_new_tokens:
        node_env["MAX_NEW_TOKENS"] = str(args.max_new_tokens)
    node_env.update(dict(kv.split("=", 1) for kv in args.env))
    node_cmd = shutil.which(args.node) or args.node
    yml = out / "node_check.yml"
    yml.write_text(dataflow(sys.executable, node_cmd, node_env), encoding="utf-8")
    env = dict(os.environ, NODE_CHECK_PLAN=str(out / "plan.json"), NODE_CHECK_OUT=str(out))
    env.setdefault("DORA_FINISH_DRAIN_GRACE_SECS", "off")  # dora 1.1 may stop a slow CPU run (see tools/demo.py)
    t0 = time.perf_counter()
    proc = subprocess.run([args.dora, "run", str(yml)], cwd=out / "run", env=env, capture_output=True, text=True,
                          timeout=args.timeout)
    wall = time.perf_counter() - t0
    (out / "dora_run.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    node_logs = "".join(p.read_text(errors="replace") for p in sorted((out / "run").rglob("log_primespeech*.txt")))
    (out / "node.log").write_text(node_logs)
    everything = proc.stdout + proc.stderr + node_logs
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {"steps": []}

    steps = results["steps"]
    expected = {s["name"]: s.get("expect", "completed") for s in steps_plan}
    failed = [s for s in steps if s["status"] != expected.get(s["name"], "completed")]
    first = next((s for s in steps if s["name"] == "demo 0"), None)
    again = next((s for s in steps if s["name"] == "demo 0 again"), None)
    ratio = (first["completion_s"] / again["completion_s"]
             if first and again and first["completion_s"] and again["completion_s"] else None)
    clean = proc.returncode == 0 and "terminate called" not in everything and "Traceback" not in everything
    backend = next((m for m in (json.loads(x).get("message", "") for x in results.get("logs", []))
                    if m.startswith("MLX:")), "MLX: ?")
    summary = {
        "backend": backend, "ready": results.get("ready"), "ready_s": results.get("ready_s"),
        "steps": steps, "failed": len(failed) + (len(steps_plan) - len(steps)),
        "first_over_repeat": None if ratio is None else round(ratio, 3), "dora_exit": proc.returncode,
        "clean_exit": clean, "terminate_called": "terminate called" in everything, "wall_s": round(wall, 2),
        "node_env": {k: v for k, v in node_env.items() if k != "PRIMESPEECH_MODEL_DIR"},
        "node_log": [m for m in (json.loads(x).get("message", "") for x in results.get("logs", []))
                     if any(w in m for w in ("synthesised", "took", "ready", "warm", "MLX", "dora-rs"))],
    }
    print(f"{backend}; node ready after {summary['ready_s']} s ({summary['ready']})")
    print(f"{'text':<14} {'status':<10} {'first audio s':>13} {'completion s':>12} {'audio s':>8}  text")
    for s in steps:
        fa = "-" if s["first_audio_s"] is None else f"{s['first_audio_s']:.3f}"
        done = "-" if s["completion_s"] is None else f"{s['completion_s']:.3f}"
        print(f"{s['name']:<14} {s['status']!s:<10} {fa:>13} {done:>12} {s['audio_s']:>8.2f}  {s['text'][:30]}")
    for line in summary["node_log"]:
        print("  node:", line[:240])
    print(f"first request / its repeat: {summary['first_over_repeat']}; failed: {summary['failed']}; "
          f"dora run exit {proc.returncode}, clean exit: {clean}; wall {wall:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(summary, ensure_ascii=False, indent=1))
    ok = summary["failed"] == 0 and clean
    if args.max_first_ratio is not None and (ratio is None or ratio > args.max_first_ratio):
        print(f"FAIL: first request {ratio} x its repeat (limit {args.max_first_ratio})")
        ok = False
    if not ok:
        print("FAIL:", json.dumps([s for s in steps if s in failed], ensure_ascii=False)[:2000])
        print(everything[-3000:])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
