"""Acceptance: the shipped mofa dataflows (dataflows/mofa-*.yml) through real `dora run`s, in the shapes
mofa-studio drives them, on the smoke voice (random weights, all 15 voice ids).

The TTS nodes run exactly as shipped (path, env, inputs, outputs, `~`/`$HOME` model paths); the UI
widgets around them are stood in for by tests/support/flow_node.py, behaving as mofa-dora-bridge's do:

- mofa-tts: the prompt bridge sends `{"prompt": "VOICE:Luo Xiang|..."}` with no metadata; the user
  types the next prompt after the last one was heard.
- mofa-debate: the conference segmenter sends a speaker's next segment only after the player
  reported `audio_complete` for that speaker's last one; three TTS nodes work at once.
- mofa-fm: the same, with the TTS nodes configured as upstream's Rust node is (VOICE_CHARACTER,
  no `status` output) and that node's map-schema voices.json in ~/.dora/models/primespeech.
- the debate with one TTS node on a second dora daemon (dora's multi-machine deployment, both
  daemons on this host).

Each flow runs on a different dora line so the lines share the cost: mofa-tts on 0.3 (mofa-studio's
pin), the debate on 1.x, mofa-fm on 0.4; the two-daemon debate on 0.3 and 1.x (their YAML keys for
placing a node differ).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "support"))

from dora_venv import check_line, dora_bindir  # noqa: E402
from flows import (  # noqa: E402
    StandIn,
    flow_env,
    load_flow,
    node_of,
    place_on_machines,
    run_flow,
    run_flow_on_daemons,
    smoke_home,
    stand_in_flow,
)

TTS_ROLES = ("student1", "student2", "tutor")
SEGMENTS = {  # what a debate's segmenter sends: short sentences, 5-15 characters
    "student1": ["我认为人工智能会改变教育。", "它可以因材施教。"],
    "student2": ["但是机器没有真正的情感。", "老师的陪伴更重要。"],
    "tutor": ["两位同学说得都有道理。", "我们继续讨论吧。"],
}
UPSTREAM_HEADER = re.compile(r"# Upstream: mofa-org/mofa-studio (\S+) @ ([0-9a-f]{40})\.")


def our_nodes(flow: dict) -> list[dict]:
    return [n for n in flow["nodes"] if n.get("path") == "dora-primespeech-mlx"]


# ------------------------------------------------------------------------------- the files


@pytest.mark.parametrize("name, upstream_path, tts_ids", [
    ("mofa-tts.yml", "apps/mofa-tts/dataflow/tts.yml", ["primespeech-tts"]),
    ("mofa-debate.yml", "apps/mofa-debate/dataflow/voice-chat.yml", [f"primespeech-{r}" for r in TTS_ROLES]),
    ("mofa-fm.yml", "apps/mofa-fm/dataflow/voice-chat.yml", [f"primespeech-{r}" for r in TTS_ROLES]),
])
def test_shipped_flow_is_upstreams_with_our_node(name, upstream_path, tts_ids):
    text = (ROOT / "dataflows" / name).read_text(encoding="utf-8")
    header = UPSTREAM_HEADER.search(text)
    assert header and header.group(1) == upstream_path, "the header names the upstream file and commit"
    flow = yaml.safe_load(text)
    assert [n["id"] for n in our_nodes(flow)] == tts_ids
    assert not any(n.get("path") == "dora-primespeech" for n in flow["nodes"])
    for node in our_nodes(flow):
        assert "build" not in node, f"{node['id']}: a `dora build` would reinstall the PyTorch node"
        for name_, spec in node["inputs"].items():
            assert isinstance(spec, dict) and spec["queue_size"] >= 100, f"{node['id']}/{name_}: default queue is 10"


def test_mofa_tts_keeps_its_asr_chain():
    flow = load_flow("mofa-tts.yml")
    ids = [n["id"] for n in flow["nodes"]]
    assert ids == ["mofa-audio-input", "asr", "mofa-asr-listener", "mofa-prompt-input", "primespeech-tts",
                   "mofa-audio-player"]
    tts = node_of(flow, "primespeech-tts")
    assert tts["inputs"]["text"]["source"] == "mofa-prompt-input/control"
    assert tts["outputs"] == ["audio", "status", "segment_complete", "log"]
    assert tts["env"]["PRIMESPEECH_MODEL_DIR"] == "$HOME/.dora/models/primespeech"


VOICE_LINE = re.compile(r"""(?m)(^\s*VOICE_CHARACTER:\s*)["']?[^"'\n]*["']?\s*$""")


def app_sets_voice(content: str, role: str, character: str) -> str:
    """What mofa-fm's settings screen does when a role's voice is picked (role_config.rs
    update_yaml_voice): in the block from `  - id: primespeech-<role>` to the next `  - id: `, the
    VOICE_CHARACTER line's value becomes `"<id>"`. Asserts the block has exactly one line it can edit."""
    start = re.search(rf"(?m)^  - id: primespeech-{role}\s*$", content)
    assert start, role
    following = re.search(r"(?m)^  - id: ", content[start.end():])
    end = start.end() + following.start() if following else len(content)
    block = content[start.start():end]
    assert len(VOICE_LINE.findall(block)) == 1, f"{role}: exactly one VOICE_CHARACTER line the app can match"
    assert not re.search(r"(?m)^\s*VOICE_NAME:", block), f"{role}: the app would edit VOICE_CHARACTER only"
    return content[:start.start()] + VOICE_LINE.sub(rf'\1"{character}"', block) + content[end:]


def test_mofa_fm_voice_lines_survive_the_apps_rewrite():
    content = (ROOT / "dataflows" / "mofa-fm.yml").read_text(encoding="utf-8")
    for role, character in zip(TTS_ROLES, ("mayun", "yangmi", "doubao")):
        content = app_sets_voice(content, role, character)
    flow = yaml.safe_load(content)
    assert [n["env"]["VOICE_CHARACTER"] for n in our_nodes(flow)] == ["mayun", "yangmi", "doubao"]
    assert "status" not in node_of(flow, "primespeech-student1")["outputs"]  # as upstream: no status output


# ------------------------------------------------------------------------------- real runs


def audio_of(record: dict, port: str | None = None) -> list[dict]:
    return [e for e in record["received"] if e["input"].startswith("audio") and e["input"] != "audio_complete"
            and (port is None or e["input"] == port)]


def check_audio_message(e: dict) -> None:
    assert e["arrow_type"] == "list<item: float>"  # pa.array([samples]) as dora-primespeech sends it
    assert e["samples"] > 0 and e["peak"] > 0
    assert e["metadata"]["sample_rate"] == 32000 and e["metadata_types"]["sample_rate"] == "int"
    assert abs(e["metadata"]["duration"] - e["samples"] / 32000) < 1e-6


def segmenter_plan(tts_prefix: str = "text_segment_") -> dict:
    lanes = [{"output": f"{tts_prefix}{who}", "participant": who, "texts": SEGMENTS[who], "metadata": "segmenter",
              "question_id": 7, "advance": {"input": "audio_complete", "participant": who}} for who in TTS_ROLES]
    return {"lanes": lanes, "timeout_s": 800}


def check_debate(run, player_id: str, log_id: str, with_status: bool) -> None:
    assert run.returncode == 0, run.failure()
    segmenter, player, system_log = run.records["multi-text-segmenter"], run.records[player_id], run.records[log_id]
    assert segmenter["finished"], run.failure()
    for who in TTS_ROLES:
        heard = audio_of(player, f"audio_{who}")
        assert len(heard) == len(SEGMENTS[who]), (who, run.failure())  # one audio per segment, none lost
        for e in heard:
            check_audio_message(e)
            assert e["metadata"]["question_id"] == 7 and e["metadata_types"]["question_id"] == "int"
        assert [e["metadata"]["session_status"] for e in heard] == ["started", "ended"]
        # the segmenter's pacing held: a speaker's second segment left after its first was heard
        sent = [s for s in segmenter["sent"] if s["output"] == f"text_segment_{who}"]
        assert sent[1]["at"] >= heard[0]["at"]
    completes = [s for s in player["sent"] if s["output"] == "audio_complete"]
    assert len(completes) == sum(len(v) for v in SEGMENTS.values())
    logs = [e for e in system_log["received"] if e["input"].startswith("tts") and e["input"].endswith("_log")]
    assert {e["input"] for e in logs} == {"tts1_log", "tts2_log", "tts3_log"}
    for e in logs:
        body = json.loads(e["value"][0])
        assert body["node"] and body["level"] in ("DEBUG", "INFO", "WARNING", "ERROR") and body["message"]
        assert body["level"] != "ERROR", body
    statuses = [(e["input"], e["value"][0]) for e in system_log["received"] if e["input"].endswith("_status")
                and e["input"].startswith("tts")]
    if with_status:
        # upstream reads `status` without a queue_size: on dora 0.3/0.4 such an input keeps only the
        # newest of a burst (ready, busy, idle come within milliseconds), so not every state arrives
        assert {i for i, _ in statuses} == {"tts1_status", "tts2_status", "tts3_status"}
        assert all(s in ("ready", "busy", "idle") for _, s in statuses), statuses
    else:
        assert not statuses


def debate_stand_ins() -> dict[str, StandIn]:
    return {"multi-text-segmenter": StandIn("driver", plan=segmenter_plan()),
            "mofa-audio-player-debate": StandIn("player"),
            "mofa-system-log-debate": StandIn("recorder")}


def prepared_voices(run) -> dict[str, str]:
    """Node id -> the voice it prepared at start (its log: "voice '<id>' prepared in ...")."""
    found = {}
    for node, text in run.logs.items():
        match = re.search(r"voice '([^']+)' prepared in", text)
        if match:
            found[node] = match.group(1)
    return found


def test_mofa_tts_prompt_flow(tmp_path):
    line = "0.3"
    bindir = dora_bindir(line)
    check_line(line, bindir)
    records = tmp_path / "records"
    records.mkdir()
    prompts = [json.dumps({"prompt": "VOICE:Luo Xiang|大家好，今天我们聊一聊法律。"}, ensure_ascii=False),
               json.dumps({"prompt": "谢谢大家。"}, ensure_ascii=False)]
    plan = {"lanes": [{"output": "control", "texts": prompts, "metadata": "none", "advance": {"input": "audio"}}],
            "timeout_s": 800}
    flow = stand_in_flow(load_flow("mofa-tts.yml"), ["primespeech-tts"], {
        # the app's prompt widget; it also hears the audio, as the user does, before typing again
        "mofa-prompt-input": StandIn("driver", inputs={"audio": {"source": "primespeech-tts/audio", "queue_size": 100}},
                                     plan=plan),
        "mofa-audio-player": StandIn("recorder"),
    }, records)
    run = run_flow(bindir, flow, tmp_path, flow_env(bindir, smoke_home(tmp_path)), timeout=900)
    assert run.returncode == 0, run.failure()
    assert run.records["mofa-prompt-input"]["finished"], run.failure()

    heard = audio_of(run.records["mofa-audio-player"])
    assert len(heard) == 2, run.failure()  # one audio message per prompt (batch mode, what the app expects)
    for e in heard:
        check_audio_message(e)
        assert e["metadata"]["question_id"] == "default" and e["metadata"]["session_status"] == "unknown"
    node_log = run.logs["primespeech-tts"]
    assert "voice 'Luo Xiang' prepared" in node_log, node_log[-3000:]  # the VOICE: prefix switched the voice
    assert "unknown voice" not in node_log and "Traceback" not in node_log


def test_mofa_debate_three_voices(tmp_path):
    line = "1.x"
    bindir = dora_bindir(line)
    check_line(line, bindir)
    records = tmp_path / "records"
    records.mkdir()
    flow = stand_in_flow(load_flow("mofa-debate.yml"), [f"primespeech-{r}" for r in TTS_ROLES], debate_stand_ins(),
                         records)
    run = run_flow(bindir, flow, tmp_path, flow_env(bindir, smoke_home(tmp_path)), timeout=900)
    check_debate(run, "mofa-audio-player-debate", "mofa-system-log-debate", with_status=True)
    assert prepared_voices(run) == {"primespeech-student1": "Zhao Daniu", "primespeech-student2": "Chen Yifan",
                                    "primespeech-tutor": "Luo Xiang"}


@pytest.mark.parametrize("line", ["0.3", "1.x"])  # `_unstable_deploy` (0.3, 0.4) and `deploy` (1.x)
def test_mofa_debate_with_a_voice_on_a_second_daemon(tmp_path, line):
    """dora's multi-machine deployment on one host: a coordinator, daemons A and B; the tutor's TTS
    node runs under daemon B, its audio crosses to the player under A."""
    bindir = dora_bindir(line)
    check_line(line, bindir)
    records = tmp_path / "records"
    records.mkdir()
    flow = stand_in_flow(load_flow("mofa-debate.yml"), [f"primespeech-{r}" for r in TTS_ROLES], debate_stand_ins(),
                         records)
    flow = place_on_machines(flow, {"primespeech-tutor": "B"}, tmp_path, line)
    run = run_flow_on_daemons(bindir, flow, tmp_path, flow_env(bindir, smoke_home(tmp_path)), line, timeout=900)
    check_debate(run, "mofa-audio-player-debate", "mofa-system-log-debate", with_status=True)
    # dora prefixes each node's lines with its daemon: the tutor ran under B, the others under A
    assert "primespeech-tutor on daemon `B`" in run.output, run.failure()
    assert "primespeech-student1 on daemon `A`" in run.output, run.failure()


MOFA_FM_VOICES = {  # dora-gpt-sovits-mlx's voices.json (map schema): ids, aliases, clips relative to the base
    "default_voice": "doubao",
    "models_base_path": "~/.dora/models/primespeech",
    "voices": {
        "doubao": {"ref_audio": "moyoyo/ref_audios/doubao_ref_mix_new.wav",
                   "ref_text": "这家resturant的steak很有名，但是vegetable salad的price有点贵", "aliases": ["default"]},
        "dnz": {"ref_audio": "moyoyo/ref_audios/dnz_ref.wav", "ref_text": "你好，我是赵大牛。",
                "speed_factor": 1.1, "aliases": ["daniu", "zhaodaniu"]},
        "yfc": {"ref_audio": "moyoyo/ref_audios/yfc_ref.wav", "ref_text": "你好，我是陈一凡。",
                "aliases": ["yifan", "chenyifan"]},
        "luoxiang": {"ref_audio": "moyoyo/ref_audios/luoxiang_ref.wav", "ref_text": "你好，我是罗翔。",
                     "aliases": ["luo"]},
        # a character with no built-in voice: zero-shot from its clip on Doubao's weights
        "marc": {"ref_audio": "moyoyo/ref_audios/maple_ref.wav", "ref_text": "Hello, this is Marc speaking.",
                 "aliases": ["fewshot"]},
    },
}


def test_mofa_fm_voice_character(tmp_path):
    """mofa-fm as the app runs it after the user picked Marc for the tutor: VOICE_CHARACTER of the
    Rust node's voices.json, built-in voices for dnz/yfc, a zero-shot voice for marc."""
    line = "0.4"
    bindir = dora_bindir(line)
    check_line(line, bindir)
    records = tmp_path / "records"
    records.mkdir()
    content = app_sets_voice((ROOT / "dataflows" / "mofa-fm.yml").read_text(encoding="utf-8"), "tutor", "marc")
    flow = stand_in_flow(yaml.safe_load(content), [f"primespeech-{r}" for r in TTS_ROLES], {
        "multi-text-segmenter": StandIn("driver", plan=segmenter_plan()),
        "mofa-audio-player": StandIn("player"),
        "mofa-system-log": StandIn("recorder"),
    }, records)
    run = run_flow(bindir, flow, tmp_path, flow_env(bindir, smoke_home(tmp_path, MOFA_FM_VOICES)), timeout=900)
    check_debate(run, "mofa-audio-player", "mofa-system-log", with_status=False)
    startup = {}
    for node, text in run.logs.items():
        if node.startswith("primespeech-"):
            assert "Traceback" not in text and "is not a known voice" not in text, (node, text[-3000:])
            assert "voice characters from" in text and "voices.json" in text, (node, text[-3000:])
            startup[node] = re.search(r"startup voice '([^']+)' \(([^)]*)", text).groups()
    assert startup["primespeech-student1"][0] == "Zhao Daniu", startup
    assert "VOICE_CHARACTER='dnz'" in startup["primespeech-student1"][1], startup
    assert startup["primespeech-student2"][0] == "Chen Yifan", startup
    assert "zero-shot" in startup["primespeech-tutor"][1], startup
