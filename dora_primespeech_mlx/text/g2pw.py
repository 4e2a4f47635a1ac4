"""G2PW: Chinese polyphone readings from dora-primespeech's g2pW ONNX model.

dora-primespeech (its bundled GPT-SoVITS ``text/g2pw``, upstream of 2024-09 plus the 2024-12
per-character override fix) reads every Chinese sentence with g2pW, a BERT classifier over
bopomofo readings, instead of pypinyin's word dictionary. This module reproduces that path:

1. the hanzi run is converted to Taiwan traditional characters (OpenCC ``s2tw``, as upstream);
2. each character listed in ``POLYPHONIC_CHARS.txt`` (less a fixed exclusion list) becomes one
   query row: the whole run tokenised per character, its label mask and char id, and the token
   position of the character; one ONNX call scores all rows and the argmax label is the reading;
3. other characters take ``MONOPHONIC_CHARS.txt`` or pypinyin's ``TONE3`` reading of the run;
4. bopomofo → pinyin through ``bopomofo_to_pinyin_wo_tune_dict.json``; a label the table cannot
   spell falls back to pypinyin for that one character;
5. the chinese frontend then applies the phrase dictionary (:func:`G2PW.correct`), tone sandhi
   and erhua exactly as on the pypinyin path.

Files: ``g2pW.onnx``, ``config.py``, ``POLYPHONIC_CHARS.txt``, ``MONOPHONIC_CHARS.txt``,
``bopomofo_to_pinyin_wo_tune_dict.json`` and ``char_bopomofo_dict.json`` are read from the user's
``G2PWModel`` folder; the tokenizer is the RoBERTa folder's ``tokenizer.json`` (``tokenizers``
library); the phrase dictionary ships as ``data/zh_g2pw_phrases.json.gz`` (upstream's
``polyphonic.rep`` + ``polyphonic-fix.rep``, see tools/oracle/refs_g2pw.py).

onnxruntime and opencc-python-reimplemented are dependencies of the package (the ``[g2pw]`` extra
names them too, for older install commands): without them, or without ``g2pW.onnx``,
:func:`configure_g2pw` logs one line and the frontend keeps pypinyin; :func:`g2pw_status` returns
that line for adapters (the Dora node puts it on its ``log`` output).
"""

from __future__ import annotations

import ast
import gzip
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
from pypinyin import Style, pinyin
from pypinyin.constants import RE_HANS
from pypinyin.contrib.tone_convert import to_finals_tone3, to_initials, to_tone
from pypinyin.converter import UltimateConverter, _remove_dup_and_empty
from pypinyin.core import Pinyin
from pypinyin.seg.simpleseg import simple_seg

from .zh_normalize import traditional_to_simplified

logger = logging.getLogger(__name__)

__all__ = ["G2PW", "G2PWConfig", "configure_g2pw", "g2pw_status", "load_g2pw", "phrase_dict"]

MODEL_FILE = "g2pW.onnx"
_FIX = "re-download the G2PWModel folder"
_MAX_LEN = 512  # BERT positions: [CLS] + 510 tokens + [SEP]
# upstream's fixed exceptions: these stay with pypinyin / are never taken from MONOPHONIC_CHARS
_NOT_POLYPHONIC = frozenset("一不和咋嗲剖差攢倒難奔勁拗肖瘙誒泊听噢")
_NOT_MONOPHONIC = frozenset("似攢")
_ASCII_WORD = re.compile(r"[a-zA-Z0-9]+")


@dataclass(frozen=True)
class G2PWConfig:
    """The two fields of ``G2PWModel/config.py`` that inference reads (upstream defaults)."""

    use_mask: bool = True
    use_char_phoneme: bool = False

    @classmethod
    def from_file(cls, path: Path) -> G2PWConfig:
        """Read ``config.py`` without running it: only top-level literal assignments count."""
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"{path}: cannot read the g2pW config ({e}); re-download the G2PWModel folder") from e
        values = {}
        for node in tree.body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                try:
                    values[node.targets[0].id] = ast.literal_eval(node.value)
                except ValueError:
                    continue  # upstream executes the file; fields we need are plain literals
        return cls(**{k: bool(values[k]) for k in ("use_mask", "use_char_phoneme") if k in values})


# ---------------------------------------------------------------------------------------------
# data


@lru_cache(maxsize=1)
def phrase_dict() -> dict[str, tuple[str, ...]]:
    """dora's phrase / character overrides (word → TONE3 readings), applied after g2pW."""
    path = resources.files(__package__).joinpath("data", "zh_g2pw_phrases.json.gz")
    with path.open("rb") as f:
        raw = json.loads(gzip.decompress(f.read()).decode("utf-8"))
    return {word: tuple(readings.split(" ")) for word, readings in raw.items()}


def _read_table(path: Path) -> list[tuple[str, str]]:
    """``char<TAB>bopomofo`` lines, split the way upstream does (whole file stripped, then '\\n')."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing; {_FIX} (it ships with g2pW.onnx)") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e}); {_FIX}") from e
    rows = []
    for n, line in enumerate(text.strip().split("\n"), 1):
        parts = line.split("\t")
        if len(parts) != 2:
            raise ValueError(f"{path}:{n}: expected 'char<TAB>bopomofo', got {line!r}; {_FIX}")
        rows.append((parts[0], parts[1]))
    return rows


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing; {_FIX} (it ships with g2pW.onnx)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); {_FIX}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object; {_FIX}")  # noqa: TRY004 (bad file content)
    return data


# ---------------------------------------------------------------------------------------------
# model input


def _words_and_maps(text: str) -> tuple[list[str], list[int | None], list[tuple[int, int]]]:
    """Split into words (ASCII alnum runs, or single other characters; spaces dropped).

    Returns the words, for each character its word index (None for spaces), and each word's
    (start, end) in ``text``.
    """
    words: list[str] = []
    char2word: list[int | None] = []
    word_spans: list[tuple[int, int]] = []
    i = 0
    while i < len(text):
        if text[i] == " ":
            char2word.append(None)
            i += 1
            continue
        m = _ASCII_WORD.match(text, i)
        end = m.end() if m else i + 1
        word_spans.append((i, end))
        char2word.extend([len(words)] * (end - i))
        words.append(text[i:end])
        i = end
    return words, char2word, word_spans


def _tokenize_with_maps(tokenizer, text: str) -> tuple[list[str], list[int | None], list[tuple[int, int]]]:
    """WordPiece tokens of ``text`` word by word, with char → token and token → char-span maps."""
    words, char2token, word_spans = _words_and_maps(text)
    tokens: list[str] = []
    token_spans: list[tuple[int, int]] = []
    for word, (start, end) in zip(words, word_spans):
        pieces = tokenizer.encode(word, add_special_tokens=False).tokens
        if not pieces or pieces == ["[UNK]"]:
            token_spans.append((start, end))
            tokens.append("[UNK]")
            continue
        pos = start
        for piece in pieces:
            length = len(piece.removeprefix("##"))
            token_spans.append((pos, pos + length))
            pos += length
            tokens.append(piece)
    for t, (start, end) in enumerate(token_spans):
        for c in range(start, end):
            char2token[c] = t
    return tokens, char2token, token_spans


def _truncate(text: str, query: int, tokens: list[str], char2token: list, token_spans: list, max_len: int):
    """Keep a window of ``max_len - 2`` tokens centred on the query character (upstream's rule)."""
    keep = max_len - 2
    if len(tokens) <= keep:
        return text, query, tokens, char2token
    t_start = char2token[query] - keep // 2
    t_end = t_start + keep
    if t_start < 0:
        t_start, t_end = 0, keep
    elif t_end > len(tokens):
        t_start, t_end = len(tokens) - keep, len(tokens)
    c_start, c_end = token_spans[t_start][0], token_spans[t_end - 1][1]
    char2token = [None if t is None else t - t_start for t in char2token[c_start:c_end]]
    return text[c_start:c_end], query - c_start, tokens[t_start:t_end], char2token


# ---------------------------------------------------------------------------------------------
# resolver


class G2PW:
    """dora-primespeech's g2pW polyphone resolver (ONNX Runtime session + tables + tokenizer).

    Build it with :func:`load_g2pw`. ``session`` needs only ``run(output_names, feeds)`` as
    ONNX Runtime's ``InferenceSession`` has it.
    """

    def __init__(self, session, tokenizer, config: G2PWConfig, polyphonic: list[tuple[str, str]],
                 monophonic: list[tuple[str, str]], bopomofo_to_pinyin: dict[str, str],
                 char_bopomofo: dict, s2tw=None, folder: Path | None = None):
        self.session = session
        self.tokenizer = tokenizer
        self.config = config
        self.folder = folder
        self._s2tw = s2tw  # callable str -> str (OpenCC s2tw) or None
        if config.use_char_phoneme:
            self.labels = sorted({f"{c} {p}" for c, p in polyphonic})
        else:
            self.labels = sorted({p for _, p in polyphonic})
        index = {label: i for i, label in enumerate(self.labels)}
        self.char2labels: dict[str, list[int]] = {}
        for c, p in polyphonic:
            self.char2labels.setdefault(c, []).append(index[f"{c} {p}" if config.use_char_phoneme else p])
        self.chars = sorted(self.char2labels)
        self._char_id = {c: i for i, c in enumerate(self.chars)}
        self.polyphonic_chars = frozenset(self.chars) - _NOT_POLYPHONIC
        self.monophonic = {c: p for c, p in monophonic}  # a repeated char keeps its last line
        for c in _NOT_MONOPHONIC:
            self.monophonic.pop(c, None)
        self.bopomofo_to_pinyin = bopomofo_to_pinyin
        self.char_bopomofo = char_bopomofo  # loaded as upstream does; it changes no reading
        ids = {t: tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[UNK]")}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"the tokenizer has no {missing} token; "
                             "use chinese-roberta-wwm-ext-large's tokenizer.json")
        self._unk_id = ids["[UNK]"]
        self._pinyin = _G2PWPinyin(_G2PWConverter(self))

    # -- per hanzi run ----------------------------------------------------------------------

    def _to_pinyin(self, bopomofo: str) -> str | None:
        tone = bopomofo[-1:]
        if not tone or tone not in "12345":
            where = self.folder or "the G2PWModel folder"
            raise ValueError(f"g2pW reading {bopomofo!r} has no tone digit; check POLYPHONIC_CHARS.txt in {where}")
        body = self.bopomofo_to_pinyin.get(bopomofo[:-1])
        if not body:
            logger.debug("g2pW reading %r has no pinyin spelling; pypinyin reads that character", bopomofo)
            return None
        return body + tone

    def model_inputs(self, text: str, queries: Sequence[int]) -> dict[str, np.ndarray]:
        """The six ONNX inputs for the characters of ``text`` at positions ``queries``."""
        rows: dict[str, list] = {k: [] for k in ("input_ids", "token_type_ids", "attention_mask",
                                                 "phoneme_mask", "char_ids", "position_ids")}
        text = text.lower()
        all_tokens, all_char2token, spans = _tokenize_with_maps(self.tokenizer, text)
        for query in queries:
            t_text, t_query, tokens, char2token = _truncate(text, query, all_tokens, all_char2token, spans, _MAX_LEN)
            ids = [self._token_id(t) for t in ["[CLS]", *tokens, "[SEP]"]]
            char = t_text[t_query]
            if self.config.use_mask:
                allowed = set(self.char2labels[char])
                mask = [1.0 if i in allowed else 0.0 for i in range(len(self.labels))]
            else:
                mask = [1.0] * len(self.labels)
            rows["input_ids"].append(ids)
            rows["token_type_ids"].append([0] * len(ids))
            rows["attention_mask"].append([1] * len(ids))
            rows["phoneme_mask"].append(mask)
            rows["char_ids"].append(self._char_id[char])
            rows["position_ids"].append(char2token[t_query] + 1)  # +1: [CLS] comes first
        out = {k: np.asarray(v, dtype=np.int64) for k, v in rows.items() if k != "phoneme_mask"}
        out["phoneme_mask"] = np.asarray(rows["phoneme_mask"], dtype=np.float32)
        return out

    def _token_id(self, token: str) -> int:
        i = self.tokenizer.token_to_id(token)
        return self._unk_id if i is None else i

    def predict(self, text: str) -> list[str | None]:
        """TONE3 pinyin for each character of one hanzi run; None where upstream asks pypinyin.

        Polyphonic characters are resolved by the model, monophonic ones by the table, the rest
        by pypinyin's reading of the whole run (in simplified characters).
        """
        if self._s2tw is not None:
            converted = self._s2tw(text)
            if len(converted) != len(text):
                raise ValueError(f"OpenCC s2tw changed the length of {text!r} (→ {converted!r})")
            text = converted
        fallback = pinyin(traditional_to_simplified(text), neutral_tone_with_five=True, style=Style.TONE3)
        result: list[str | None] = []
        queries = []
        for i, char in enumerate(text):
            if char in self.polyphonic_chars:
                queries.append(i)
                result.append(None)
            elif char in self.monophonic:
                result.append(self._to_pinyin(self.monophonic[char]))
            else:
                result.append(fallback[i][0])
        if queries:
            feeds = self.model_inputs(text, queries)
            probs = np.asarray(self.session.run([], feeds)[0])  # (queries, labels)
            for i, label in zip(queries, probs.argmax(axis=1).tolist()):
                reading = self.labels[label]
                if self.config.use_char_phoneme:
                    reading = reading.split(" ")[1]
                result[i] = self._to_pinyin(reading)
        return result

    # -- what the Chinese frontend calls ----------------------------------------------------

    def lazy_pinyin(self, text: str) -> list[str]:
        """One TONE3 item per hanzi (neutral tone 5), punctuation runs as themselves.

        Upstream's ``G2PWPinyin.lazy_pinyin(seg, neutral_tone_with_five=True, style=TONE3)``.
        """
        return self._pinyin.lazy_pinyin(text, style=Style.TONE3)

    @staticmethod
    def correct(word: str, readings: list[str]) -> list[str]:
        """Apply the phrase dictionary: a whole-word entry wins, else single-character entries."""
        table = phrase_dict()
        if word in table:
            return list(table[word])
        readings = list(readings)
        for i, char in enumerate(word):
            if char in table:
                readings[i] = table[char][0]
        return readings

    def initials_finals(self, word: str, readings: list[str]) -> tuple[list[str], list[str]]:
        """Initials and ``FINALS_TONE3`` finals of ``word`` from its slice of :meth:`lazy_pinyin`."""
        initials, finals = [], []
        for reading in self.correct(word, readings):
            if reading[0].isalpha():
                initials.append(to_initials(reading))
                finals.append(to_finals_tone3(reading, neutral_tone_with_five=True))
            else:  # punctuation passes through as both parts
                initials.append(reading)
                finals.append(reading)
        return initials, finals


class _G2PWPinyin(Pinyin):
    def get_seg(self, **kwargs):
        return simple_seg  # upstream cuts only at hanzi / non-hanzi boundaries, no phrase segmentation


class _G2PWConverter(UltimateConverter):
    """pypinyin converter whose hanzi readings come from g2pW (upstream's ``Converter``)."""

    def __init__(self, g2pw: G2PW):
        super().__init__(v_to_u=False, neutral_tone_with_five=True, tone_sandhi=False)
        self._g2pw = g2pw

    def convert(self, words, style, heteronym, errors, strict, **kwargs):
        if not RE_HANS.match(words):
            return super().convert(words, style, heteronym, errors, strict)
        pys = []
        for char, reading in zip(words, self._g2pw.predict(words)):
            if reading is None:  # no g2pW reading: pypinyin's own, for this character alone
                pys.extend(super().convert(char, Style.TONE, heteronym, errors, strict))
            else:
                pys.append([to_tone(reading)])
        post = self.post_pinyin(words, heteronym, pys)
        if post is not None:
            pys = post
        return _remove_dup_and_empty(self.convert_styles(pys, words, style, heteronym, errors, strict))


# ---------------------------------------------------------------------------------------------
# loading


def load_g2pw(g2pw_dir: str | Path, tokenizer_dir: str | Path) -> G2PW:
    """Build the resolver from a ``G2PWModel`` folder and the RoBERTa tokenizer folder.

    Raises:
        ImportError: onnxruntime or opencc (dependencies; the ``[g2pw]`` extra) is not installed.
        FileNotFoundError / ValueError: a file of the folder is missing or malformed (named).
    """
    folder = Path(g2pw_dir)
    model = folder / MODEL_FILE
    if not model.is_file():
        raise FileNotFoundError(f"{model} is missing; download the G2PWModel folder into {folder.parent}")
    import onnxruntime as ort  # optional extra
    from opencc import OpenCC  # opencc-python-reimplemented, as dora-primespeech uses

    from ..models.bert import load_tokenizer

    if not (folder / "config.py").is_file():
        raise FileNotFoundError(f"{folder / 'config.py'} is missing; re-download the G2PWModel folder")
    config = G2PWConfig.from_file(folder / "config.py")
    polyphonic = _read_table(folder / "POLYPHONIC_CHARS.txt")
    monophonic = _read_table(folder / "MONOPHONIC_CHARS.txt")
    bopomofo = _read_json(folder / "bopomofo_to_pinyin_wo_tune_dict.json")
    char_bopomofo = _read_json(folder / "char_bopomofo_dict.json")
    tokenizer = load_tokenizer(tokenizer_dir)

    options = ort.SessionOptions()  # upstream's settings
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = 2
    try:
        session = ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise ValueError(f"{model}: ONNX Runtime cannot load it ({e}); re-download the G2PWModel folder") from e
    names = {i.name for i in session.get_inputs()}
    expected = {"input_ids", "token_type_ids", "attention_mask", "phoneme_mask", "char_ids", "position_ids"}
    if names != expected:
        raise ValueError(f"{model}: inputs {sorted(names)} are not g2pW's {sorted(expected)}")
    converter = OpenCC("s2tw")
    return G2PW(session, tokenizer, config, polyphonic, monophonic, bopomofo, char_bopomofo,
                s2tw=converter.convert, folder=folder)


def _model_dir_from_env() -> Path | None:
    value = os.environ.get("PRIMESPEECH_MODEL_DIR")
    if not value:
        return None
    return Path(os.path.expanduser(os.path.expandvars(value)))


def configure_g2pw(model_dir: str | Path | None = None, tokenizer_dir: str | Path | None = None) -> G2PW | None:
    """Install the g2pW resolver in the Chinese frontend if ``<model_dir>/G2PWModel/g2pW.onnx`` exists.

    Args:
        model_dir: the ``$PRIMESPEECH_MODEL_DIR`` folder (default: that variable, ``~``/``$VARS``
            expanded).
        tokenizer_dir: folder with the RoBERTa ``tokenizer.json`` (default
            ``<model_dir>/moyoyo/chinese-roberta-wwm-ext-large``, dora's ``bert_path``).

    Returns:
        The installed resolver, or None when the frontend keeps pypinyin's readings (no model
        file, or onnxruntime/opencc missing); either way one log line says which, and
        :func:`g2pw_status` returns it.

    Raises:
        FileNotFoundError / ValueError: ``g2pW.onnx`` exists but its folder or the tokenizer is
            incomplete or malformed.
    """
    from . import chinese

    root = Path(os.path.expanduser(str(model_dir))) if model_dir is not None else _model_dir_from_env()
    model = None if root is None else root / "G2PWModel" / MODEL_FILE
    if model is None or not model.is_file():
        where = model if model is not None else "$PRIMESPEECH_MODEL_DIR/G2PWModel (variable not set)"
        # dora-primespeech itself refuses to start without it; we fall back, and say so once
        _report("WARNING", f"G2PW model not found at {where}: Chinese polyphones use pypinyin's readings")
        chinese.set_polyphone_resolver(None)
        return None
    if tokenizer_dir is None:
        tokenizer_dir = root / "moyoyo" / "chinese-roberta-wwm-ext-large"
    try:
        resolver = load_g2pw(model.parent, tokenizer_dir)
    except ImportError as e:
        _report("WARNING", f"G2PW model found at {model} but {e.name or e} is not installed (a dependency: "
                           "reinstall, or pip install 'dora-primespeech-mlx[g2pw]'): Chinese polyphones use "
                           "pypinyin's readings")
        chinese.set_polyphone_resolver(None)
        return None
    chinese.set_polyphone_resolver(resolver)
    _report("INFO", f"G2PW polyphone model loaded from {model.parent}: Chinese polyphones use g2pW")
    return resolver


_status: tuple[str, str] | None = None


def _report(level: str, message: str) -> None:
    global _status
    _status = (level, message)
    logger.log(logging.getLevelName(level), "%s", message)


def g2pw_status() -> tuple[str, str] | None:
    """(level, message) of the last :func:`configure_g2pw`: G2PW in use, or pypinyin and why; None
    before any call."""
    return _status
