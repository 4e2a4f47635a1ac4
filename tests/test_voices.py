"""The voice registry: built-in ids, path resolution, user voices, custom voices."""

from __future__ import annotations

import json

import pytest

from dora_primespeech_mlx.voices import VoiceRegistry

BUILTIN_IDS = ["Doubao", "Luo Xiang", "Yang Mi", "Zhou Jielun", "Ma Yun", "Chen Yifan", "Zhao Daniu", "Maple",
               "Cove", "BYS", "Ellen", "Juniper", "Ma Baoguo", "Shen Yi", "Trump"]


def test_fifteen_builtin_voices_with_exact_ids(tmp_path):
    reg = VoiceRegistry(tmp_path)
    assert reg.ids() == BUILTIN_IDS
    doubao = reg.get("Doubao")
    assert doubao.gpt_weights == tmp_path / "moyoyo" / "GPT_weights" / "doubao-mixed.ckpt"
    assert doubao.prompt_text == "这家resturant的steak很有名，但是vegetable salad的price有点贵"
    assert (doubao.text_lang, doubao.speed_factor) == ("zh", 1.1)
    assert (reg.get("Maple").text_lang, reg.get("Maple").speed_factor) == ("en", 1.0)
    assert len(doubao.missing_files()) == 3


def test_oracle_model_dir_has_doubao(fixtures):
    assert VoiceRegistry(fixtures.model_dir).get("Doubao").missing_files() == []


def test_model_dir_from_env_with_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("BASE", str(tmp_path))
    monkeypatch.setenv("PRIMESPEECH_MODEL_DIR", "$BASE/models")
    assert VoiceRegistry().moyoyo == tmp_path / "models" / "moyoyo"


def test_user_voices_file_adds_and_overrides(tmp_path):
    (tmp_path / "voices.json").write_text(json.dumps({"voices": [
        {"id": "Mine", "gpt_weights": "GPT_weights/mine.ckpt", "sovits_weights": "SoVITS_weights/mine.pth",
         "reference_audio": "/abs/mine.wav", "prompt_text": "hello", "prompt_lang": "en"},
        {"id": "Doubao", "gpt_weights": "GPT_weights/d2.ckpt", "sovits_weights": "SoVITS_weights/d2.pth",
         "reference_audio": "ref_audios/d2.wav", "prompt_text": "你好", "speed_factor": 1.0},
    ]}))
    reg = VoiceRegistry(tmp_path)
    assert reg.ids()[-1] == "Mine" and len(reg.ids()) == 16
    mine = reg.get("Mine")
    assert str(mine.reference_audio) == "/abs/mine.wav" and mine.text_lang == "en"
    assert reg.get("Doubao").gpt_weights.name == "d2.ckpt"


@pytest.mark.parametrize("content, needle", [
    ("{not json", "not valid JSON"),
    (json.dumps({"voices": [{"id": "x"}]}), "voice entry"),
    (json.dumps([{"id": "x", "gpt_weights": "a", "sovits_weights": "b", "reference_audio": "c",
                  "prompt_text": "p", "prompt_lang": "ja"}]), "language 'ja'"),
])
def test_bad_user_voices_file_names_the_file(tmp_path, content, needle):
    (tmp_path / "voices.json").write_text(content)
    with pytest.raises(ValueError, match=needle) as exc:
        VoiceRegistry(tmp_path)
    assert "voices.json" in str(exc.value)


def test_unknown_voice_lists_known_ones(tmp_path):
    with pytest.raises(KeyError, match="Luo Xiang"):
        VoiceRegistry(tmp_path).get("luoxiang")


def test_custom_voice_uses_doubao_weights(tmp_path):
    reg = VoiceRegistry(tmp_path)
    v = reg.custom("~/clips/me.wav", "参考", "ko")
    assert v.gpt_weights == reg.get("Doubao").gpt_weights
    assert v.prompt_lang == "auto" and v.speed_factor == 1.1 and "~" not in str(v.reference_audio)
