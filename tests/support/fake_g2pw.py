"""A small stand-in for dora-primespeech's G2PWModel folder, for wiring tests.

``g2pW.onnx`` here has the real model's interface (inputs ``input_ids``, ``token_type_ids``,
``attention_mask`` int64 (batch, seq), ``phoneme_mask`` float32 (batch, labels), ``char_ids``,
``position_ids`` int64 (batch,); first output float32 (batch, labels)), but a transparent rule:

    probs = softmax(char_table[char_ids] + prev_table[input_ids[b, position_ids[b] - 1]]) * phoneme_mask

so a test decides the argmax per character (``char_table``) and per preceding token
(``prev_table``), and can see that the mask, the char id, the position and the tokens arrive.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CONFIG_PY = """\
manual_seed = 1313
model_source = 'bert-base-chinese'
window_size = 32
num_workers = 2
use_mask = True
use_conditional = True
param_conditional = {
    'bias': True,
    'char-linear': True,
    'pos-linear': False,
    'char+pos-second': True,
}

batch_size = 256
use_pos = True
param_pos = {
    'weight': 0.1,
    'pos_joint_training': True,
}
"""


def build_model(path: Path, char_table: np.ndarray, prev_table: np.ndarray, prev_mod: int | None = None) -> None:
    """Write the stand-in ``g2pW.onnx``: (n_chars, labels) and (vocab, labels) score tables.

    With ``prev_mod``, the previous token id is taken modulo it (a small table for a big vocab).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n_labels = char_table.shape[1]
    assert prev_table.shape[1] == n_labels
    i64, f32 = TensorProto.INT64, TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("input_ids", i64, ["batch", "seq"]),
        helper.make_tensor_value_info("token_type_ids", i64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", i64, ["batch", "seq"]),
        helper.make_tensor_value_info("phoneme_mask", f32, ["batch", n_labels]),
        helper.make_tensor_value_info("char_ids", i64, ["batch"]),
        helper.make_tensor_value_info("position_ids", i64, ["batch"]),
    ]
    outputs = [helper.make_tensor_value_info("probs", f32, ["batch", n_labels])]
    inits = [
        numpy_helper.from_array(char_table.astype(np.float32), "char_table"),
        numpy_helper.from_array(prev_table.astype(np.float32), "prev_table"),
        numpy_helper.from_array(np.array(1, np.int64), "one"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
    ]
    if prev_mod:
        inits.append(numpy_helper.from_array(np.array(prev_mod, np.int64), "modulus"))
    nodes = [
        helper.make_node("Sub", ["position_ids", "one"], ["prev_pos"]),
        helper.make_node("Unsqueeze", ["prev_pos", "axis1"], ["prev_pos2"]),
        helper.make_node("GatherElements", ["input_ids", "prev_pos2"], ["prev_tok2"], axis=1),
        helper.make_node("Squeeze", ["prev_tok2", "axis1"], ["prev_tok_raw"]),
        helper.make_node("Mod", ["prev_tok_raw", "modulus"], ["prev_tok"]) if prev_mod else
        helper.make_node("Identity", ["prev_tok_raw"], ["prev_tok"]),
        helper.make_node("Gather", ["prev_table", "prev_tok"], ["prev_score"], axis=0),
        helper.make_node("Gather", ["char_table", "char_ids"], ["char_score"], axis=0),
        helper.make_node("Add", ["char_score", "prev_score"], ["score0"]),
        # the two mask inputs take part (times zero), as in a real BERT
        helper.make_node("Add", ["attention_mask", "token_type_ids"], ["am_tt"]),
        helper.make_node("Cast", ["am_tt"], ["am_tt_f"], to=f32),
        helper.make_node("ReduceSum", ["am_tt_f"], ["am_sum"], keepdims=1),
        helper.make_node("Mul", ["am_sum", "zero"], ["nothing"]),
        helper.make_node("Add", ["score0", "nothing"], ["score"]),
        helper.make_node("Softmax", ["score"], ["soft"], axis=-1),
        helper.make_node("Mul", ["soft", "phoneme_mask"], ["probs"]),
    ]
    graph = helper.make_graph(nodes, "fake_g2pw", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime >= 1.17
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def build_tokenizer(folder: Path, chars: str) -> dict[str, int]:
    """A BERT-style WordPiece ``tokenizer.json`` whose vocabulary is the given characters."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *dict.fromkeys(chars)])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return vocab


def write_folder(folder: Path, polyphonic: list[tuple[str, str]], monophonic: list[tuple[str, str]],
                 bopomofo_to_pinyin: dict[str, str], char_table: np.ndarray, prev_table: np.ndarray) -> None:
    """Lay out a G2PWModel folder with the stand-in model and the given tables."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.py").write_text(CONFIG_PY, encoding="utf-8")
    (folder / "POLYPHONIC_CHARS.txt").write_text("".join(f"{c}\t{p}\n" for c, p in polyphonic), encoding="utf-8")
    (folder / "MONOPHONIC_CHARS.txt").write_text("".join(f"{c}\t{p}\n" for c, p in monophonic), encoding="utf-8")
    (folder / "bopomofo_to_pinyin_wo_tune_dict.json").write_text(json.dumps(bopomofo_to_pinyin, ensure_ascii=False),
                                                                 encoding="utf-8")
    char_bopomofo: dict[str, list[str]] = {}
    for c, p in polyphonic + monophonic:
        char_bopomofo.setdefault(c, []).append(p)
    (folder / "char_bopomofo_dict.json").write_text(json.dumps(char_bopomofo, ensure_ascii=False), encoding="utf-8")
    build_model(folder / "g2pW.onnx", char_table, prev_table)


def labels_of(polyphonic: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """(labels, chars) in the order g2pW indexes them: both sorted, as upstream builds them."""
    return sorted({p for _, p in polyphonic}), sorted({c for c, _ in polyphonic})
