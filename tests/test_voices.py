"""The voice registry: built-in ids, path resolution, user voices, custom voices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dora_primespeech_mlx.voices import (CharacterTable, VoiceRegistry, find_characters_file, known_names, payload_file,
                                         resolve_voice)

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


GOOD_ENTRY = {"id": "Mine", "gpt_weights": "GPT_weights/mine.ckpt", "sovits_weights": "SoVITS_weights/mine.pth",
              "reference_audio": "ref_audios/mine.wav", "prompt_text": "hello", "prompt_lang": "en"}


@pytest.mark.parametrize("content, needle", [
    ("{not json", "not valid JSON"),
    (b"\xff\xfe{}", "cannot be read"),
    ('"just a string"', "neither a list of voices"),
    (json.dumps({"voices": 5}), "neither a list of voices"),
    (json.dumps({"voices": [{"id": "x"}, GOOD_ENTRY]}), "voice entry"),
    (json.dumps([GOOD_ENTRY, {**GOOD_ENTRY, "id": "x", "prompt_lang": "ja"}]), "language 'ja'"),
    (json.dumps([GOOD_ENTRY, {**GOOD_ENTRY, "id": "y", "speed_factor": "inf"}]), "speed_factor"),
    (json.dumps([GOOD_ENTRY, "oops", {**GOOD_ENTRY, "id": 5}]), "voice entry"),
])
@pytest.mark.parametrize("name", ["voices.json", "voices-mlx.json"])
def test_bad_user_voices_file_is_skipped_with_a_warning_naming_it(tmp_path, content, needle, name):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    reg = VoiceRegistry(tmp_path)  # never raises: built-in voices keep working
    assert reg.ids()[:15] == BUILTIN_IDS
    assert reg.warnings and all(name in w for w in reg.warnings)
    assert any(needle in w for w in reg.warnings)
    # good entries of a file with a bad one are kept
    assert ("Mine" in reg) == ("Mine" in content if isinstance(content, str) else False)


def test_unreadable_voices_file_is_skipped(tmp_path):
    (tmp_path / "voices.json").mkdir()  # exists, but reading it fails
    reg = VoiceRegistry(tmp_path)
    assert reg.ids() == BUILTIN_IDS and "cannot be read" in reg.warnings[0]


def test_rust_map_shaped_voices_json_is_not_ours_and_stops_nothing(tmp_path):
    """dora-gpt-sovits-mlx's voices.json in the model dir: the registry leaves it to the characters."""
    (tmp_path / "voices.json").write_text(json.dumps(RUST_VOICES))
    reg = VoiceRegistry(tmp_path)
    assert reg.ids() == BUILTIN_IDS and reg.warnings == []


def test_own_user_voices_file_and_env_file(tmp_path, monkeypatch):
    (tmp_path / "voices-mlx.json").write_text(json.dumps([GOOD_ENTRY]))
    extra = tmp_path / "elsewhere.json"
    extra.write_text(json.dumps({"voices": [{**GOOD_ENTRY, "id": "Other"}]}))
    monkeypatch.setenv("PRIMESPEECH_VOICES_FILE", str(extra))
    reg = VoiceRegistry(tmp_path)
    assert reg.ids()[15:] == ["Mine", "Other"] and reg.warnings == []
    monkeypatch.setenv("PRIMESPEECH_VOICES_FILE", str(tmp_path / "missing.json"))
    reg = VoiceRegistry(tmp_path)
    assert "missing.json" in reg.warnings[0] and "Mine" in reg


def test_env_voices_file_with_the_rust_schema_is_named(tmp_path, monkeypatch):
    extra = tmp_path / "rust.json"
    extra.write_text(json.dumps(RUST_VOICES))
    monkeypatch.setenv("PRIMESPEECH_VOICES_FILE", str(extra))
    reg = VoiceRegistry(tmp_path)
    assert reg.ids() == BUILTIN_IDS and "VOICES_CONFIG" in reg.warnings[0]


def test_unknown_voice_lists_known_ones(tmp_path):
    with pytest.raises(KeyError, match="Luo Xiang"):
        VoiceRegistry(tmp_path).get("luoxiang")


def test_custom_voice_uses_doubao_weights_and_takes_the_path_literally(tmp_path, monkeypatch):
    reg = VoiceRegistry(tmp_path)
    v = reg.custom("/clips/me.wav", "参考", "ko")
    assert v.gpt_weights == reg.get("Doubao").gpt_weights and v.sovits_weights == reg.get("Doubao").sovits_weights
    assert v.prompt_lang == "auto" and v.speed_factor == 1.1 and v.reference_audio == Path("/clips/me.wav")
    monkeypatch.setenv("SECRET_DIR", "/very/secret")
    assert str(reg.custom("/x/${SECRET_DIR}/a.wav", "p", "zh").reference_audio) == "/x/${SECRET_DIR}/a.wav"
    for relative in ("~/clips/me.wav", "$HOME/me.wav", "${SECRET_DIR}/a.wav", "clips/me.wav", "  "):
        with pytest.raises(ValueError, match="absolute path") as exc:
            reg.custom(relative, "参考", "zh")
        assert "/very/secret" not in str(exc.value)


def test_trained_voice_has_its_own_weights(tmp_path):
    reg = VoiceRegistry(tmp_path)
    v = reg.trained("/t/me.ckpt", "/t/me.pth", "/t/ref.wav", "参考文本", "EN".lower())
    assert (v.gpt_weights, v.sovits_weights, v.reference_audio) == (Path("/t/me.ckpt"), Path("/t/me.pth"),
                                                                      Path("/t/ref.wav"))
    assert (v.prompt_text, v.prompt_lang, v.text_lang, v.speed_factor) == ("参考文本", "en", "en", 1.1)
    with pytest.raises(ValueError, match="absolute"):
        reg.trained("~/me.ckpt", "/t/me.pth", "/t/ref.wav", "p", "zh")


# ------------------------------------------------------------------------ payload paths


def test_payload_file_checks(tmp_path):
    clip = tmp_path / "clip.wav"
    clip.write_bytes(b"RIFF")
    assert payload_file(str(clip), "clip") == clip
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        payload_file(str(tmp_path / "nope.wav"), "clip")
    with pytest.raises(FileNotFoundError):
        payload_file(str(tmp_path), "clip")  # a folder
    with pytest.raises(ValueError, match=r"must be a \.ckpt file"):
        payload_file(str(clip), "GPT weights", (".ckpt",))
    for hostile in ("/" + "a" * 5000 + ".wav", "/tmp/" + ("b" * 200 + "/") * 30 + "x.wav"):
        with pytest.raises((ValueError, FileNotFoundError)) as exc:
            payload_file(hostile, "clip")
        assert len(str(exc.value)) < 400  # the path is shortened in the message
    for odd in ("/tmp/\ud800.wav", "/tmp/a\x00b.wav"):
        with pytest.raises((ValueError, FileNotFoundError)):
            payload_file(odd, "clip")


# ------------------------------------------------------------------------ characters

RUST_VOICES = {
    "default_voice": "doubao",
    "models_base_path": "~/.dora/models/primespeech",
    "voices": {
        "doubao": {"ref_audio": "moyoyo/ref_audios/doubao_ref_mix_new.wav", "ref_text": "这家resturant的steak很有名",
                   "aliases": ["default"]},
        "dnz": {"ref_audio": "moyoyo/ref_audios/dnz_ref.wav", "ref_text": "今天啊", "aliases": ["daniu", "zhaodaniu"]},
        "marc": {"ref_audio": "moyoyo/ref_audios/fewshot_ref.wav", "ref_text": "Hello there.", "speed_factor": 1.2,
                 "aliases": ["Fewshot"], "codes_path": "x.bin", "vits_onnx": "y.onnx"},
    },
}


def write_rust(path, data=None, **changes):
    data = json.loads(json.dumps(data or RUST_VOICES))
    data.update(changes)
    path.write_text(json.dumps(data))
    return path


def test_character_table_paths_ids_and_aliases(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SECRET", "/secret")
    data = json.loads(json.dumps(RUST_VOICES))
    data["voices"]["Abs"] = {"ref_audio": "/abs/a.wav", "ref_text": "a"}
    data["voices"]["tilde"] = {"ref_audio": "~/b.wav", "ref_text": "b"}
    data["voices"]["var"] = {"ref_audio": "$SECRET/c.wav", "ref_text": "c"}
    table, warnings = CharacterTable.load(write_rust(tmp_path / "voices.json", data))
    assert warnings == []
    base = tmp_path / "home" / ".dora" / "models" / "primespeech"
    assert table.find("MARC").ref_audio == base / "moyoyo" / "ref_audios" / "fewshot_ref.wav"
    assert table.find("marc").speed_factor == 1.2 and table.find("marc").ref_text == "Hello there."
    assert table.find("FewShot").id == "marc" and table.find(" DaNiu ").id == "dnz"
    assert table.find("abs").ref_audio == Path("/abs/a.wav")
    assert table.find("tilde").ref_audio == tmp_path / "home" / "b.wav"
    assert table.find("var").ref_audio == base / "$SECRET" / "c.wav"  # `$VAR` is never expanded
    assert table.find("nobody") is None
    assert table.ids() == ["doubao", "dnz", "marc", "abs", "tilde", "var"]


def test_character_table_skips_bad_entries_with_warnings(tmp_path):
    data = {"models_base_path": 5, "voices": {
        "ok": {"ref_audio": "/a.wav", "ref_text": "a"},
        "OK": {"ref_audio": "/b.wav", "ref_text": "b"},
        "noref": {"ref_text": "a"}, "notext": {"ref_audio": "/a.wav"}, "list": [1],
        "fast": {"ref_audio": "/a.wav", "ref_text": "a", "speed_factor": float("inf")},
        "badalias": {"ref_audio": "/a.wav", "ref_text": "a", "aliases": "x"},
    }}
    path = tmp_path / "v.json"
    path.write_text(json.dumps(data))
    table, warnings = CharacterTable.load(path)
    assert table.ids() == ["ok"]
    assert len(warnings) == 7 and all(str(path) in w for w in warnings)
    assert any("models_base_path" in w for w in warnings)


@pytest.mark.parametrize("content", ["{broken", "[1, 2]", json.dumps({"voices": []})])
def test_character_table_refuses_other_files(tmp_path, content):
    path = tmp_path / "v.json"
    path.write_text(content)
    table, warnings = CharacterTable.load(path)
    assert table is None and str(path) in warnings[0]


def test_find_characters_file_places_and_precedence(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    assert find_characters_file(model_dir) == (None, [])
    (home / ".dora/models/primespeech").mkdir(parents=True)
    home_file = write_rust(home / ".dora/models/primespeech/voices.json")
    table, _ = find_characters_file(model_dir)
    assert table.path == home_file
    own = write_rust(model_dir / "voices.json")
    assert find_characters_file(model_dir)[0].path == own
    explicit = write_rust(tmp_path / "explicit.json")
    assert find_characters_file(model_dir, explicit)[0].path == explicit
    table, warnings = find_characters_file(model_dir, tmp_path / "missing.json")
    assert table is None and "VOICES_CONFIG" in warnings[0]
    # our list schema in the model dir is the registry's: the home file is used, nothing to warn about
    own.write_text(json.dumps([GOOD_ENTRY]))
    table, warnings = find_characters_file(model_dir)
    assert table.path == home_file and warnings == []
    home_file.write_text("{corrupt")
    table, warnings = find_characters_file(model_dir)
    assert table is None and str(home_file) in warnings[0]


def test_resolve_voice_names(tmp_path):
    reg = VoiceRegistry(tmp_path)
    assert resolve_voice("Luo Xiang", reg).voice.id == "Luo Xiang"
    for name, vid in [("dnz", "Zhao Daniu"), ("DNZ", "Zhao Daniu"), ("DaNiu", "Zhao Daniu"),
                      ("zhaodaniu", "Zhao Daniu"), ("yfc", "Chen Yifan"), ("ChenYifan", "Chen Yifan"),
                      ("luoxiang", "Luo Xiang"), ("LUO", "Luo Xiang"), ("default", "Doubao"), ("doubao", "Doubao"),
                      ("yangmi", "Yang Mi"), ("Yang", "Yang Mi"), ("mayun", "Ma Yun"), ("ma", "Ma Yun"),
                      ("bys", "BYS"), ("zhou jielun", "Zhou Jielun"), ("trump", "Trump"), ("mabaoguo", "Ma Baoguo")]:
        found = resolve_voice(name, reg)
        assert found.voice.id == vid, name
        assert "built-in table" in found.how or found.how == "a voice id"
    for name in ("marc", "fewshot", "MARC"):
        found = resolve_voice(name, reg)
        assert found.voice is None and "no built-in voice" in found.problem and "Marc" in found.problem
    assert resolve_voice("nobody", reg) is None


def test_resolve_voice_through_the_rust_voices_file(tmp_path):
    reg = VoiceRegistry(tmp_path)
    table, _ = CharacterTable.from_data(json.loads(json.dumps(RUST_VOICES)), tmp_path / "voices.json")
    # a character that is one of our voices: its own fine-tuned weights and clip
    for name in ("dnz", "DaNiu"):
        found = resolve_voice(name, reg, table)
        assert found.voice == reg.get("Zhao Daniu") and "voices.json" in found.how and not found.zero_shot
    # any other: zero-shot from its clip on Doubao's weights
    found = resolve_voice("FEWSHOT", reg, table)
    voice = found.voice
    assert found.zero_shot and voice.id == "marc" and voice.gpt_weights == reg.get("Doubao").gpt_weights
    assert voice.reference_audio.name == "fewshot_ref.wav" and voice.prompt_text == "Hello there."
    assert (voice.speed_factor, voice.prompt_lang, voice.text_lang) == (1.2, "auto", "auto")
    # names the file does not know still go through the built-in table
    assert resolve_voice("yfc", reg, table).voice.id == "Chen Yifan"
    assert "yfc" in known_names(reg, table) and "marc" in known_names(reg, table)
