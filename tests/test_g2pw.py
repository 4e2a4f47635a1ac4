"""G2PW polyphone resolver: wiring into the Chinese frontend, with a stand-in g2pW.onnx.

The real g2pW weights are not available offline, so a small ONNX graph with the real model's
input/output names, dtypes and shapes (tests/support/fake_g2pw.py) decides readings by a visible
rule. The tests check that its argmax is what the frontend speaks, which characters reach it and
with which inputs, the phrase dictionary after it, and the fallbacks and errors around it.
"""

from __future__ import annotations

import gzip
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dora_primespeech_mlx.text import chinese, clean_text
from dora_primespeech_mlx.text import g2pw as g2pw_mod
from dora_primespeech_mlx.text.g2pw import G2PW, configure_g2pw, load_g2pw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "support"))
import fake_g2pw  # noqa: E402

# traditional forms: the text is converted with OpenCC s2tw before the tables are consulted
POLYPHONIC = [
    ("行", "ㄒㄧㄥ2"), ("行", "ㄏㄤ2"),
    ("長", "ㄔㄤ2"), ("長", "ㄓㄤ3"),
    ("廈", "ㄒㄧㄚ4"), ("廈", "ㄕㄚ4"),
    ("覺", "ㄐㄩㄝ2"), ("覺", "ㄐㄧㄠ4"),  # ㄐㄧㄠ has no pinyin below: pypinyin decides
    ("熵", "ㄉㄧ1"), ("熵", "ㄕㄤ1"),
    ("一", "ㄧ1"), ("一", "ㄧ2"),  # listed, but upstream never asks the model about 一
]  # fmt: skip
MONOPHONIC = [("我", "ㄨㄛ1"), ("似", "ㄙ1")]  # odd tones, so the table's use is visible; 似 is excluded
BOPOMOFO = {"ㄒㄧㄥ": "xing", "ㄏㄤ": "hang", "ㄔㄤ": "chang", "ㄓㄤ": "zhang", "ㄒㄧㄚ": "xia", "ㄕㄚ": "sha",
            "ㄐㄩㄝ": "jue", "ㄧ": "yi", "ㄉㄧ": "di", "ㄕㄤ": "shang", "ㄨㄛ": "wo", "ㄙ": "si"}
VOCAB_CHARS = "我在银銀行工作长長很高兴興他觉覺得大厦廈熵增加了好似一个個人字的路走"
LABELS, CHARS = fake_g2pw.labels_of(POLYPHONIC)


def _tables(prefer: dict[str, str], after: dict[str, dict[str, float]] | None = None, vocab=None):
    """Score tables: ``prefer[char] = label`` (+2), ``after[token][label]`` (+5) for the next char."""
    char_table = np.zeros((len(CHARS), len(LABELS)), np.float32)
    for c, label in prefer.items():
        char_table[CHARS.index(c), LABELS.index(label)] = 2.0
    prev_table = np.zeros((len(vocab or {}) or 1, len(LABELS)), np.float32)
    for token, scores in (after or {}).items():
        for label, s in scores.items():
            prev_table[vocab[token], LABELS.index(label)] = s
    return char_table, prev_table


@pytest.fixture(autouse=True)
def _pypinyin_after_each_test():
    yield
    chinese.set_polyphone_resolver(None)  # other test modules expect upstream's pypinyin path


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A $PRIMESPEECH_MODEL_DIR with a G2PWModel folder and a RoBERTa-style tokenizer.json."""
    vocab = fake_g2pw.build_tokenizer(tmp_path / "moyoyo" / "chinese-roberta-wwm-ext-large", VOCAB_CHARS)
    char_table, prev_table = _tables(
        prefer={"行": "ㄒㄧㄥ2", "長": "ㄓㄤ3", "廈": "ㄒㄧㄚ4", "覺": "ㄐㄧㄠ4", "熵": "ㄉㄧ1", "一": "ㄧ2"},
        after={"銀": {"ㄏㄤ2": 5.0}, "在": {"ㄒㄧㄚ4": 9.0}},
        vocab=vocab,
    )
    fake_g2pw.write_folder(tmp_path / "G2PWModel", POLYPHONIC, MONOPHONIC, BOPOMOFO, char_table, prev_table)
    return tmp_path


def _syllables(text: str) -> list[str]:
    """One 'initial+final' string per character of the normalised text (punctuation as itself)."""
    phones, word2ph, _ = clean_text(text, "zh")
    out, i = [], 0
    for n in word2ph:
        out.append("".join(phones[i : i + n]))
        i += n
    return out


class _Recorder:
    """Wraps the ONNX session and keeps every feed dict it was given."""

    def __init__(self, session):
        self.session, self.calls = session, []

    def run(self, names, feeds):
        self.calls.append({k: v.copy() for k, v in feeds.items()})
        return self.session.run(names, feeds)


# ---------------------------------------------------------------------------------------------
# the model's argmax is what gets spoken


def test_polyphones_take_the_model_argmax_in_context(model_dir):
    resolver = configure_g2pw(model_dir)
    assert resolver is not None
    # raw readings (before the phrase dictionary): 行 alone takes the char preference (xing2),
    # after 銀 the context rule (hang2)
    assert resolver.lazy_pinyin("行长很高兴,") == ["xing2", "zhang3", "hen3", "gao1", "xing4", ","]
    assert resolver.lazy_pinyin("我在银行工作")[3] == "hang2"
    # end to end (行长 is not in the phrase dictionary); pypinyin says hang2 here
    assert _syllables("行长很高兴")[:2] == ["xing2", "zhang3"]
    chinese.set_polyphone_resolver(None)
    assert _syllables("行长很高兴")[:2] == ["hang2", "zhang3"]


def test_flipping_the_model_flips_the_reading(model_dir):
    configure_g2pw(model_dir)
    assert _syllables("行长很高兴")[:2] == ["xing2", "zhang3"]
    tokenizer_json = model_dir / "moyoyo" / "chinese-roberta-wwm-ext-large" / "tokenizer.json"
    vocab = json.loads(tokenizer_json.read_text())["model"]["vocab"]
    char_table, prev_table = _tables(prefer={"行": "ㄏㄤ2", "長": "ㄔㄤ2"}, vocab=vocab)
    fake_g2pw.build_model(model_dir / "G2PWModel" / "g2pW.onnx", char_table, prev_table)
    configure_g2pw(model_dir)
    assert _syllables("行长很高兴")[:2] == ["hang2", "chang2"]


def test_phoneme_mask_keeps_the_choice_among_the_characters_readings(model_dir):
    # "在" pushes ㄒㄧㄚ4 (a reading of 廈 only) by +9; for 行 after 在 the mask must exclude it
    resolver = configure_g2pw(model_dir)
    assert resolver.predict("在行") == ["zai4", "xing2"]


def test_model_inputs_match_the_g2pw_signature(model_dir):
    resolver = load_g2pw(model_dir / "G2PWModel", model_dir / "moyoyo" / "chinese-roberta-wwm-ext-large")
    rec = resolver.session = _Recorder(resolver.session)
    text = "我在银行工作"
    assert resolver.predict(text)[3] == "hang2"
    (feeds,) = rec.calls
    assert {k: (v.dtype, v.shape) for k, v in feeds.items()} == {
        "input_ids": (np.int64, (1, 8)), "token_type_ids": (np.int64, (1, 8)), "attention_mask": (np.int64, (1, 8)),
        "phoneme_mask": (np.float32, (1, len(LABELS))), "char_ids": (np.int64, (1,)), "position_ids": (np.int64, (1,)),
    }  # fmt: skip
    tok = resolver.tokenizer
    assert feeds["input_ids"][0].tolist() == [tok.token_to_id(t) for t in ["[CLS]", *"我在銀行工作", "[SEP]"]]
    assert feeds["token_type_ids"].sum() == 0 and feeds["attention_mask"].min() == 1
    assert feeds["position_ids"].tolist() == [4]  # 行 is character 3, token 4 after [CLS]
    assert feeds["char_ids"].tolist() == [CHARS.index("行")]
    allowed = [LABELS.index("ㄒㄧㄥ2"), LABELS.index("ㄏㄤ2")]
    assert np.flatnonzero(feeds["phoneme_mask"][0]).tolist() == sorted(allowed)


def test_monophonic_and_excluded_characters_bypass_the_model(model_dir):
    resolver = configure_g2pw(model_dir)
    rec = resolver.session = _Recorder(resolver.session)
    # 我: MONOPHONIC table (wo1, not pypinyin's wo3); 似: excluded from the table -> pypinyin;
    # 一: listed as polyphonic but excluded -> pypinyin (then 一 sandhi); no polyphone -> no model call
    assert resolver.predict("我好似一个人") == ["wo1", "hao3", "si4", "yi2", "ge4", "ren2"]
    assert rec.calls == []
    assert _syllables("好似一个人") == ["hao3", "si04", "yi2", "ge5", "ren2"]
    # one call per hanzi run, one row per polyphonic character, nothing else
    resolver.predict("一行长")
    assert [c["char_ids"].tolist() for c in rec.calls] == [[CHARS.index("行"), CHARS.index("長")]]
    assert rec.calls[0]["position_ids"].tolist() == [2, 3]


def test_unspellable_label_and_phrase_dictionary(model_dir):
    resolver = configure_g2pw(model_dir)
    # the model picks ㄐㄧㄠ4 for 覺, which the bopomofo table cannot spell: pypinyin reads 觉 alone
    assert resolver.predict("他觉") == ["ta1", None]
    assert resolver.lazy_pinyin("他觉") == ["ta1", "jue2"]
    # the phrase dictionary comes after the model: 大厦 -> sha4 although the model says xia4
    assert resolver.lazy_pinyin("大厦很高")[1] == "xia4"
    assert _syllables("大厦很高")[:2] == ["da4", "sha4"]
    assert G2PW.correct("大厦", ["da4", "xia4"]) == ["da4", "sha4"]
    # 熵: dora-primespeech's single-character entry beats the model's di1, inside any word
    assert resolver.lazy_pinyin("熵增加了")[0] == "di1"
    assert _syllables("熵增加了")[0] == "shang1"
    assert G2PW.correct("熵增", ["di1", "zeng1"]) == ["shang1", "zeng1"]


def test_long_runs_are_cut_to_512_tokens_around_the_query(model_dir):
    resolver = load_g2pw(model_dir / "G2PWModel", model_dir / "moyoyo" / "chinese-roberta-wwm-ext-large")
    text = "行" + "我" * 299 + "行" + "我" * 400
    feeds = resolver.model_inputs(text, [300, 0])
    assert feeds["input_ids"].shape == (2, 512)
    assert feeds["position_ids"].tolist() == [1 + 255, 1]  # window of 510 centred on the query; at the start
    vocab_id = resolver.tokenizer.token_to_id("行")
    assert feeds["input_ids"][0, feeds["position_ids"][0]] == vocab_id


# ---------------------------------------------------------------------------------------------
# fallbacks and errors


def test_missing_model_keeps_pypinyin_with_one_log_line(tmp_path, caplog, monkeypatch):
    expected = clean_text("我在银行工作，行长很高兴。", "zh")
    with caplog.at_level(logging.INFO, logger="dora_primespeech_mlx.text.g2pw"):
        assert configure_g2pw(tmp_path) is None
    records = [r for r in caplog.records if r.name == "dora_primespeech_mlx.text.g2pw"]
    assert len(records) == 1 and "G2PWModel" in records[0].getMessage() and "pypinyin" in records[0].getMessage()
    assert clean_text("我在银行工作，行长很高兴。", "zh") == expected
    caplog.clear()
    monkeypatch.delenv("PRIMESPEECH_MODEL_DIR", raising=False)
    with caplog.at_level(logging.INFO, logger="dora_primespeech_mlx.text.g2pw"):
        assert configure_g2pw() is None
    assert len(caplog.records) == 1 and "PRIMESPEECH_MODEL_DIR" in caplog.records[0].getMessage()


def test_env_variable_is_expanded(model_dir, monkeypatch):
    monkeypatch.setenv("G2PW_TEST_ROOT", str(model_dir))
    monkeypatch.setenv("PRIMESPEECH_MODEL_DIR", "$G2PW_TEST_ROOT")
    assert configure_g2pw() is not None
    assert _syllables("行长很高兴")[0] == "xing2"


def test_missing_extra_is_a_warning_naming_it(model_dir, caplog, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with caplog.at_level(logging.INFO, logger="dora_primespeech_mlx.text.g2pw"):
        assert configure_g2pw(model_dir) is None
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and "[g2pw]" in record.getMessage()
    assert _syllables("行长很高兴")[0] == "hang2"  # pypinyin


@pytest.mark.parametrize(
    "breakage, error, match",
    [
        (lambda d: (d / "POLYPHONIC_CHARS.txt").unlink(), FileNotFoundError, r"POLYPHONIC_CHARS\.txt is missing"),
        (lambda d: (d / "MONOPHONIC_CHARS.txt").write_text("我ㄨㄛ3\n", "utf-8"), ValueError,
         r"MONOPHONIC_CHARS\.txt:1: expected"),
        (lambda d: (d / "bopomofo_to_pinyin_wo_tune_dict.json").write_text("{oops", "utf-8"), ValueError,
         r"bopomofo_to_pinyin_wo_tune_dict\.json: not valid JSON"),
        (lambda d: (d / "char_bopomofo_dict.json").unlink(), FileNotFoundError, r"char_bopomofo_dict\.json is missing"),
        (lambda d: (d / "config.py").unlink(), FileNotFoundError, r"config\.py is missing"),
        (lambda d: (d / "config.py").write_text("use_mask = (", "utf-8"), ValueError, r"config\.py: cannot read"),
        (lambda d: (d / "g2pW.onnx").write_bytes(b"not a model"), ValueError, r"g2pW\.onnx: ONNX Runtime cannot load"),
    ],
)
def test_malformed_folder_names_the_file(model_dir, breakage, error, match):
    breakage(model_dir / "G2PWModel")
    with pytest.raises(error, match=match):
        configure_g2pw(model_dir)


def test_wrong_model_signature_and_missing_tokenizer(model_dir):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(model_dir / "G2PWModel" / "g2pW.onnx"))
    with pytest.raises(ValueError, match=r"g2pW\.onnx: inputs \['x'\] are not g2pW's"):
        configure_g2pw(model_dir)
    shutil.rmtree(model_dir / "moyoyo")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        configure_g2pw(model_dir)


# ---------------------------------------------------------------------------------------------
# shipped data


def test_phrase_dictionary_equals_upstream_files(oracle_python, tmp_path):
    """data/zh_g2pw_phrases.json.gz is what tools/oracle/refs_g2pw.py derives from the wheel."""
    out = tmp_path / "phrases.json.gz"
    subprocess.run([str(oracle_python), str(ROOT / "tools" / "oracle" / "refs_g2pw.py"), str(out)], check=True,
                   capture_output=True)
    shipped = ROOT / "dora_primespeech_mlx" / "text" / "data" / "zh_g2pw_phrases.json.gz"
    assert json.loads(gzip.decompress(out.read_bytes())) == json.loads(gzip.decompress(shipped.read_bytes()))
    table = g2pw_mod.phrase_dict()
    assert len(table) == 45047 and table["大厦"] == ("da4", "sha4") and table["熵"] == ("shang1",)
