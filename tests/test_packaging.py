"""The package as a user gets it: built into a wheel, installed (not editable) into a fresh venv.

An editable install reads everything from the repository, so a file missing from the wheel (package
data, a module) or code that reads the repository (`voices/builtin.json` beside the package) only
shows here. The fresh venv gets the wheel alone (`--no-deps`); its dependencies come from the test
environment's site-packages through a .pth line (plain path: that folder's own .pth files, among
them this repository's editable hook, are not run).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUPPORT = ROOT / "tests" / "support"
sys.path.insert(0, str(SUPPORT))

from flows import FLOW_NODE, flow_env, run_flow  # noqa: E402

CONSOLE_SCRIPTS = {"dora-primespeech-mlx": "dora_primespeech_mlx.node:main",
                   "primespeech-mlx": "dora_primespeech_mlx.cli:main",
                   "gpt-sovits-mlx": "dora_primespeech_mlx.cli:main"}


def test_packaged_voice_list_is_the_repository_one():
    """voices/builtin.json (the data the repository documents) and the copy the package ships agree."""
    assert (ROOT / "voices" / "builtin.json").read_bytes() == \
        (ROOT / "dora_primespeech_mlx" / "_data" / "voices" / "builtin.json").read_bytes()


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("wheel")
    # build from a copy: setuptools keeps a build/ folder in the source tree, whose leftovers
    # (files since removed) would end up in the wheel
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "dora_primespeech_mlx", src / "dora_primespeech_mlx",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = work / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(src)], check=True,
                   timeout=600)
    wheel = next(dist.glob("dora_primespeech_mlx-*.whl"))
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, timeout=300)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "test-env-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return {"wheel": wheel, "bin": venv / "bin", "site": site, "work": work}


def run_in(wheel_venv, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    # cwd outside the repository: nothing may be imported from the checkout
    return subprocess.run([str(a) for a in args], cwd=wheel_venv["work"], capture_output=True, text=True,
                          timeout=timeout)


def test_wheel_contents(wheel_venv):
    names = zipfile.ZipFile(wheel_venv["wheel"]).namelist()
    assert "dora_primespeech_mlx/_data/voices/builtin.json" in names
    data = {Path(n).name for n in names if n.startswith("dora_primespeech_mlx/text/data/")}
    assert data == {p.name for p in (ROOT / "dora_primespeech_mlx" / "text" / "data").iterdir()}
    modules = {n for n in names if n.endswith(".py")}
    expected = {str(p.relative_to(ROOT)) for p in (ROOT / "dora_primespeech_mlx").rglob("*.py")}
    assert expected <= modules, sorted(expected - modules)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel_venv["wheel"]).read(entry_points).decode()
    for script, target in CONSOLE_SCRIPTS.items():
        assert f"{script} = {target}" in text


def test_installed_wheel_runs_without_the_repository(wheel_venv):
    py = wheel_venv["bin"] / "python"
    where = run_in(wheel_venv, py, "-c", "import dora_primespeech_mlx as m; print(m.__file__)")
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(wheel_venv["site"]), where.stdout  # the wheel's copy
    for cli in ("primespeech-mlx", "gpt-sovits-mlx"):
        proc = run_in(wheel_venv, wheel_venv["bin"] / cli, "voices")
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert len(lines) == 15 and lines[0].startswith("Doubao") and "Luo Xiang" in proc.stdout, proc.stdout
        assert run_in(wheel_venv, wheel_venv["bin"] / cli, "--help").returncode == 0
    # the text frontend reads its dictionaries from the package (text/data)
    phones = run_in(wheel_venv, py, "-c", "from dora_primespeech_mlx.text.frontend import text_to_phone_segments as f;"
                    "print(sum(len(s.phone_ids) for s in f('你好，世界。Hello world.', 'auto')))")
    assert phones.returncode == 0 and int(phones.stdout) > 10, phones.stderr[-2000:]


def test_installed_node_answers_in_a_dataflow(wheel_venv, tmp_path):
    """The wheel's `dora-primespeech-mlx` as a dora node, with no models: it must start, import
    everything it needs, report the missing files and answer the text with `error` (no crash)."""
    bindir = Path(sys.executable).parent  # the test environment's dora CLI (1.x)
    records = tmp_path / "records"
    records.mkdir()
    plan = {"lanes": [{"output": "text", "texts": ["你好。"], "advance": {"input": "segment_complete"}}],
            "timeout_s": 120, "linger_s": 2.0}
    (records / "driver.plan.json").write_text(json.dumps(plan), encoding="utf-8")
    flow = {"nodes": [
        {"id": "driver", "path": str(FLOW_NODE),
         "env": {"FLOW_ROLE": "driver", "FLOW_NAME": "driver", "FLOW_OUT": str(records),
                 "FLOW_PLAN": str(records / "driver.plan.json")},
         "inputs": {"segment_complete": "tts/segment_complete", "status": "tts/status",
                    "log": {"source": "tts/log", "queue_size": 100}},
         "outputs": ["text"]},
        {"id": "tts", "path": str(wheel_venv["bin"] / "dora-primespeech-mlx"),
         "inputs": {"text": {"source": "driver/text", "queue_size": 100}},
         "outputs": ["audio", "segment_complete", "status", "log"],
         "env": {"PRIMESPEECH_MODEL_DIR": str(tmp_path / "no-models")}},
    ]}
    run = run_flow(bindir, flow, tmp_path, flow_env(bindir), timeout=300)
    assert run.returncode == 0, run.failure()
    got = run.records["driver"]["received"]
    done = [e for e in got if e["input"] == "segment_complete"]
    assert [e["value"][0] for e in done] == ["error"], run.failure()
    assert done[0]["metadata"]["error_stage"] == "init"
    logs = [json.loads(e["value"][0])["message"] for e in got if e["input"] == "log"]
    assert any("no-models" in m or "PRIMESPEECH_MODEL_DIR" in m for m in logs), logs
    assert "Traceback" not in run.logs.get("tts", ""), run.logs.get("tts", "")[-3000:]
