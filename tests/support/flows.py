"""Run the shipped mofa dataflows (dataflows/mofa-*.yml) for real, with their UI widgets stood in for.

A shipped file is loaded as it is; its TTS nodes stay untouched (env, inputs, outputs; `path:` too,
except that with OpenBLAS the same command is started through with_openblas.sh, see node_command),
the dynamic widget nodes that feed or read them are replaced by tests/support/flow_node.py, and every
other node (LLM clients, bridges, controller, ASR) is left out together with the inputs that read
from it. Model paths are the files' own (`~/.dora/...`, `$HOME/.dora/...`): HOME points at a folder
whose `.dora/models/primespeech/moyoyo` is the smoke voice, so the YAML runs as a user would run it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
FLOW_NODE = Path(__file__).resolve().with_name("flow_node.py")
MAX_NEW_TOKENS = "3"  # semantic tokens per sentence: mlx-cpu is slow and the smoke voice never stops
WITH_OPENBLAS = ROOT / "benchmarks" / "cpu" / "with_openblas.sh"
_openblas: bool | None = None


def openblas_available() -> bool:
    """Whether benchmarks/cpu/with_openblas.sh can put MLX on OpenBLAS here (checked once).

    mlx[cpu] on Linux links a reference BLAS (~3-6 GFLOP/s): preparing one voice (HuBERT on the
    reference clip) then takes 25-50 s per node on a 2-core runner, minutes for a three-voice flow.
    The script's pip route (the scipy-openblas32 wheel and a gcc-built shim, both cached) cuts that
    ten-fold; only the GEMM library changes, not the code under test. Where it cannot be set up (no
    gcc, no package index) the flows run on the bundled BLAS, slower; DORA_PRIMESPEECH_TEST_BLAS=bundled
    forces that.
    """
    global _openblas
    if _openblas is None:
        _openblas = False
        if os.environ.get("DORA_PRIMESPEECH_TEST_BLAS") != "bundled" and sys.platform == "linux":
            try:
                _openblas = subprocess.run([str(WITH_OPENBLAS), "--pip", "true"], capture_output=True, timeout=600,
                                           env=dict(os.environ, PYTHON=sys.executable)).returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                _openblas = False
    return _openblas


def node_command(bindir: Path) -> Path | None:
    """A `dora-primespeech-mlx` that starts `bindir`'s node under with_openblas.sh; None without
    OpenBLAS. An LD_PRELOAD set around `dora run` does not reach the nodes (dora 1.x removes it from
    their environment), and a folder put first on PATH is not enough either (dora 1.x looks in its own
    Python environment's bin/ first), so the flows name this script by its absolute path."""
    if not openblas_available():
        return None
    import oracle_env  # tests/conftest.py puts tools/oracle on sys.path

    folder = oracle_env.cache_root() / "test-node-bin" / bindir.parent.name
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "dora-primespeech-mlx"
    body = f'#!/bin/sh\nexec "{WITH_OPENBLAS}" --pip -- "{bindir / "dora-primespeech-mlx"}" "$@"\n'
    if not script.exists() or script.read_text() != body:
        tmp = folder / f".tmp-{os.getpid()}"
        tmp.write_text(body)
        tmp.chmod(0o755)
        tmp.replace(script)
    return script


def with_node_command(flow: dict, bindir: Path) -> dict:
    """`flow` with `path: dora-primespeech-mlx` pointing at node_command(bindir), when there is one."""
    command = node_command(bindir)
    if command is None:
        return flow
    return {**flow, "nodes": [{**n, "path": str(command)} if n.get("path") == "dora-primespeech-mlx" else n
                              for n in flow["nodes"]]}


def load_flow(name: str) -> dict:
    return yaml.safe_load((ROOT / "dataflows" / name).read_text(encoding="utf-8"))


def node_of(flow: dict, node_id: str) -> dict:
    return next(n for n in flow["nodes"] if n["id"] == node_id)


def source_node(source) -> str:
    text = source["source"] if isinstance(source, dict) else source
    return text.split("/", 1)[0]


@dataclass
class StandIn:
    """A widget node replaced by flow_node.py: which of its inputs and outputs to keep or add."""

    role: str  # driver | player | recorder
    inputs: dict = field(default_factory=dict)  # extra inputs (pacing of a driver)
    outputs: list | None = None  # None: the shipped node's own
    plan: dict | None = None


def stand_in_flow(flow: dict, tts: list[str], stand_ins: dict[str, StandIn], out: Path) -> dict:
    """The shipped flow cut down to `tts` nodes plus the stand-ins, wired as shipped."""
    kept = set(tts) | set(stand_ins)
    nodes = []
    for node in flow["nodes"]:
        node_id = node["id"]
        if node_id in tts:
            assert all(source_node(s) in kept for s in (node.get("inputs") or {}).values()), node_id
            nodes.append(node)
        elif node_id in stand_ins:
            spec = stand_ins[node_id]
            inputs = {k: v for k, v in (node.get("inputs") or {}).items() if source_node(v) in kept}
            inputs.update(spec.inputs)
            env = {"FLOW_ROLE": spec.role, "FLOW_NAME": node_id, "FLOW_OUT": str(out)}
            if spec.plan is not None:
                plan_file = out / f"{node_id}.plan.json"
                plan_file.write_text(json.dumps(spec.plan, ensure_ascii=False), encoding="utf-8")
                env["FLOW_PLAN"] = str(plan_file)
            replaced = {"id": node_id, "path": str(FLOW_NODE), "env": env}
            if inputs:
                replaced["inputs"] = inputs
            outputs = spec.outputs if spec.outputs is not None else node.get("outputs")
            if outputs:
                replaced["outputs"] = outputs
            nodes.append(replaced)
    return {"nodes": nodes}


def smoke_home(root: Path, voices_json: dict | None = None) -> Path:
    """A HOME whose ~/.dora/models/primespeech holds the smoke voice (all 15 ids) and, if given,
    dora-gpt-sovits-mlx's voices.json."""
    from dora_primespeech_mlx.smoke import ensure_smoke_model_dir

    home = root / "home"
    primespeech = home / ".dora" / "models" / "primespeech"
    primespeech.mkdir(parents=True)
    (primespeech / "moyoyo").symlink_to(ensure_smoke_model_dir() / "moyoyo", target_is_directory=True)
    if voices_json is not None:
        (primespeech / "voices.json").write_text(json.dumps(voices_json, ensure_ascii=False, indent=1))
    return home


def flow_env(bindir: Path, home: Path | None = None, **extra: str) -> dict:
    """Environment of `dora run`: the line's bin/ first on PATH (its python runs the .py nodes), the
    cache pinned (HOME may move), a token cap for mlx-cpu."""
    import oracle_env  # tests/conftest.py puts tools/oracle on sys.path

    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", MAX_NEW_TOKENS=MAX_NEW_TOKENS,
               DORA_PRIMESPEECH_MLX_CACHE=str(oracle_env.cache_root().resolve()), PYTHONUNBUFFERED="1",
               # with_openblas.sh keeps its files in $XDG_CACHE_HOME (HOME may move); one BLAS thread per
               # node: flows run up to three nodes on two cores
               XDG_CACHE_HOME=os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache"),
               OPENBLAS_NUM_THREADS=os.environ.get("OPENBLAS_NUM_THREADS", "1"),
               # dora-rs 1.1's finish-straggler watchdog stopped whole flows on a busy 2-core CPU
               # while the TTS node was still loading or synthesising (seen in the demo and hostile runs)
               DORA_FINISH_DRAIN_GRACE_SECS="off")
    env.pop("VIRTUAL_ENV", None)
    if home is not None:
        env["HOME"] = str(home)
    env.update(extra)
    return env


@dataclass
class FlowRun:
    returncode: int
    seconds: float
    output: str  # dora's stdout + stderr
    logs: dict[str, str]  # node id -> its log file (stdout and stderr of the node)
    records: dict[str, dict]  # stand-in node id -> what flow_node.py recorded

    def failure(self) -> str:
        tails = "\n".join(f"--- {k} ---\n{v[-2500:]}" for k, v in self.logs.items())
        return f"dora exit {self.returncode} after {self.seconds:.0f} s\n{self.output[-4000:]}\n{tails}"


def run_flow(bindir: Path, flow: dict, work: Path, env: dict, timeout: float = 900) -> FlowRun:
    """`dora run` of `flow` (written to work/flow.yml) with the CLI in `bindir`."""
    flow = with_node_command(flow, bindir)
    work.mkdir(parents=True, exist_ok=True)
    yml = work / "flow.yml"
    yml.write_text(yaml.safe_dump(flow, allow_unicode=True, sort_keys=False), encoding="utf-8")
    t0 = time.monotonic()
    try:
        proc = subprocess.run([str(bindir / "dora"), "run", str(yml)], cwd=work, env=env,
                              capture_output=True, text=True, timeout=timeout)
        code, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, output = -9, f"timed out after {timeout} s\n{exc.stdout or ''}{exc.stderr or ''}"
    return collect(work, code, time.monotonic() - t0, output)


def collect(work: Path, code: int, seconds: float, output: str) -> FlowRun:
    logs: dict[str, str] = {}
    for path in sorted(work.rglob("log_*")):  # log_<node>.txt (0.3, 0.4), log_<node>.jsonl (1.x)
        if path.suffix in (".txt", ".jsonl"):
            node = path.stem[len("log_"):]
            logs[node] = logs.get(node, "") + path.read_text(errors="replace")
    out = work / "records"
    records = {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in out.glob("*.json") if ".plan" not in p.name}
    return FlowRun(code, seconds, output if isinstance(output, str) else str(output), logs, records)




def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def place_on_machines(flow: dict, machines: dict[str, str], work: Path, line: str) -> dict:
    """`flow` with each node pinned to a daemon (`machines`: node id -> machine id, others on "A").
    dora 0.3/0.4 call the key `_unstable_deploy`, 1.x `deploy`; each rejects the other's. The working
    folder is given explicitly: 0.3 otherwise spawns remote nodes in a folder that does not exist."""
    key = "deploy" if line == "1.x" else "_unstable_deploy"
    nodes = []
    for node in flow["nodes"]:
        node = dict(node)
        node[key] = {"machine": machines.get(node["id"], "A"), "working_dir": str(work)}
        nodes.append(node)
    return {"nodes": nodes}


def run_flow_on_daemons(bindir: Path, flow: dict, work: Path, env: dict, line: str, machine_ids=("A", "B"),
                        timeout: float = 900) -> FlowRun:
    """A coordinator and one daemon per machine id on this host (dora's multi-machine set-up), then
    `dora start --attach`. Ports are picked free so parallel runs do not meet."""
    flow = with_node_command(flow, bindir)
    work.mkdir(parents=True, exist_ok=True)
    yml = work / "flow.yml"
    yml.write_text(yaml.safe_dump(flow, allow_unicode=True, sort_keys=False), encoding="utf-8")
    dora = str(bindir / "dora")
    logs_dir = work / "daemons"
    logs_dir.mkdir(exist_ok=True)
    if line == "1.x":
        port = free_port()
        coordinator = [dora, "coordinator", "--port", str(port), "--store", "memory"]
        zenoh = f"tcp/127.0.0.1:{free_port()}"  # rendezvous for the daemons (no multicast needed)
        daemon_args = ["--coordinator-port", str(port), "--zenoh-peer", zenoh]
        start_args = ["--coordinator-port", str(port)]
    else:
        port, control = free_port(), free_port()
        coordinator = [dora, "coordinator", "--port", str(port), "--control-port", str(control)]
        daemon_args = ["--coordinator-port", str(port)]
        start_args = ["--coordinator-port", str(control)]
    started: list[subprocess.Popen] = []
    log_files = []

    def spawn(cmd: list[str], name: str) -> None:
        log_files.append(open(logs_dir / f"{name}.log", "w"))  # noqa: SIM115 - closed below
        started.append(subprocess.Popen(cmd, cwd=work, env=env, stdout=log_files[-1], stderr=subprocess.STDOUT))

    t0 = time.monotonic()
    try:
        spawn(coordinator, "coordinator")
        time.sleep(1.0)
        for machine in machine_ids:
            spawn([dora, "daemon", "--machine-id", machine, "--local-listen-port", str(free_port()), *daemon_args],
                  f"daemon-{machine}")
        time.sleep(2.0)  # both daemons registered before the dataflow is placed
        try:
            proc = subprocess.run([dora, "start", str(yml), "--attach", *start_args], cwd=work, env=env,
                                  capture_output=True, text=True, timeout=timeout)
            code, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            code, output = -9, f"timed out after {timeout} s\n{exc.stdout or ''}{exc.stderr or ''}"
    finally:
        for p in reversed(started):  # only what this function started
            p.terminate()
        for p in started:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in log_files:
            f.close()
    for path in sorted(logs_dir.glob("*.log")):
        output += f"\n--- {path.name} ---\n{path.read_text(errors='replace')[-3000:]}"
    return collect(work, code, time.monotonic() - t0, output)
