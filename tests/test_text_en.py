"""English and mixed zh/en text frontend against upstream (gpt-sovits-cpufast 0.1.0).

References come from tools/oracle/refs_text_en.py in the oracle virtualenv, with explicit segments
(upstream's language detector needs a download). nltk's POS tagger needs downloaded data too, so
for sentences with a homograph the oracle is handed the tags of our tagger: that checks upstream's
pronunciation choice for equal tags; the tagger itself is checked by golden readings below.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dora_primespeech_mlx.text import english
from dora_primespeech_mlx.text.english import clean_text_en, predict_oov, text_normalize
from dora_primespeech_mlx.text.segment import split_languages
from dora_primespeech_mlx.text.symbols import cleaned_text_to_sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "support"))
from en_oracle import oracle_text_en  # noqa: E402

EN_CORPUS = [s for s in (ROOT / "tests" / "data" / "en_corpus.txt").read_text(encoding="utf-8").splitlines() if s]
MIXED_CORPUS = [s for s in (ROOT / "tests" / "data" / "mixed_corpus.txt").read_text(encoding="utf-8").splitlines() if s]
# made-up words: no dictionary entry, so they reach compound splitting or the neural model
OOV_WORDS = ["blorptastic", "zyxwvut", "frabjous", "quizzaciously", "snergle", "plonkish", "glarbnok",
             "trundlewump", "vexillologist", "chortlesome", "mimsy", "brillig", "wabe", "slithy",
             "thrummage", "kraxel", "oomphy", "yarbling", "zeugmatic", "cwtch", "fnord", "grok'd",
             "xqzt", "Zorblaxian", "Quenbridge", "Tovrek", "mxyzptlk", "vorpal", "bandersnatch",
             # random syllables that wordsegment keeps whole
             "teviguze", "fuciwuzo", "cejicawox", "suguwubun", "vidin", "nitix", "conax", "jazar",
             "wufizopisk", "komugepusk", "jesewuwox", "gizopudux", "bacevujir", "kojupozix"]
# upstream fails on these too (int() of a malformed amount)
BAD_INPUTS = ["It was (5$ only."]


def _en_item(text: str) -> dict:
    try:
        tags = english.pos_tags(text_normalize(text))
    except ValueError:  # BAD_INPUTS
        tags = None
    return {"lang": "en", "text": text, "tags": None if tags is None else [list(t) for t in tags]}


def _segment_items(text: str) -> list[dict]:
    items = []
    for span in split_languages(text, "auto"):
        items.append(_en_item(span.text) if span.lang == "en" else {"lang": "zh", "text": span.text, "tags": None})
    return items


def _ours(item: dict) -> dict:
    if item["lang"] == "en":
        phones, word2ph, norm = clean_text_en(item["text"])
    else:
        from dora_primespeech_mlx.text.cleaner import clean_text

        phones, word2ph, norm = clean_text(item["text"], "zh")
    return {"phones": list(phones), "word2ph": None if word2ph is None else [int(x) for x in word2ph],
            "norm_text": norm, "ids": cleaned_text_to_sequence(phones)}


@pytest.fixture(scope="module")
def payload() -> dict:
    segments = [[_en_item(s)] for s in EN_CORPUS + OOV_WORDS + BAD_INPUTS]
    segments += [_segment_items(s) for s in MIXED_CORPUS]
    return {"segments": segments}


@pytest.fixture(scope="module")
def oracle(request, payload) -> list[list[dict]]:
    return oracle_text_en(request, payload)["segments"]


def _mismatches(items: list[list[dict]], refs: list[list[dict]]) -> list[str]:
    bad = []
    for segs, ref_segs in zip(items, refs):
        for item, ref in zip(segs, ref_segs):
            assert "error" not in ref, f"oracle failed on {item}: {ref['error']}"
            ours = _ours(item)
            if ours != ref:
                bad.append(f"{item['lang']} {item['text']!r}:\n  ours   {ours}\n  oracle {ref}")
    return bad


def test_corpus_sizes(payload):
    assert len(EN_CORPUS) >= 100 and len(MIXED_CORPUS) >= 50
    for text in MIXED_CORPUS:  # every mixed sentence really switches language
        langs = {s.lang for s in split_languages(text, "auto")}
        assert langs == {"zh", "en"}, text


def test_english_corpus_matches_oracle(payload, oracle):
    n = len(EN_CORPUS)
    bad = _mismatches(payload["segments"][:n], oracle[:n])
    assert not bad, f"{len(bad)}/{n} English sentences differ:\n" + "\n".join(bad[:10])


def test_oov_words_match_oracle(payload, oracle):
    lo, hi = len(EN_CORPUS), len(EN_CORPUS) + len(OOV_WORDS)
    bad = _mismatches(payload["segments"][lo:hi], oracle[lo:hi])
    assert not bad, "\n".join(bad)
    # the neural model is really exercised, not only the dictionary
    seg = english._wordsegment()
    neural = [w for w in OOV_WORDS if len(w) > 3 and w.lower() not in english._cmu() and "'" not in w
              and len(seg.segment(w.lower())) == 1 and w.lower() not in english._names()]
    assert len(neural) >= 10, neural


def test_mixed_corpus_matches_oracle(payload, oracle):
    lo = len(EN_CORPUS) + len(OOV_WORDS) + len(BAD_INPUTS)
    bad = _mismatches(payload["segments"][lo:], oracle[lo:])
    assert not bad, f"{len(bad)} mixed segments differ:\n" + "\n".join(bad[:10])


def test_bad_inputs_fail_like_upstream(oracle):
    lo = len(EN_CORPUS) + len(OOV_WORDS)
    for text, ref in zip(BAD_INPUTS, oracle[lo : lo + len(BAD_INPUTS)]):
        assert "error" in ref[0] and ref[0]["error"].startswith("ValueError"), ref
        with pytest.raises(ValueError):
            clean_text_en(text)


def test_neural_g2p_known_outputs():
    # from oracle.md 7 (upstream run): the misspelt word goes through the GRU model
    assert predict_oov("resturant") == ["R", "EH1", "S", "T", "ER0", "AH0", "N", "T"]
    assert clean_text_en("resturant")[0] == ["R", "EH1", "S", "T", "ER0", "AH0", "N", "T"]


@pytest.mark.parametrize(
    ("text", "word", "expected"),
    [
        ("I will record a song.", "record", ["R", "IH0", "K", "AO1", "R", "D"]),
        ("The record is old.", "record", ["R", "EH1", "K", "ER0", "D"]),
        ("They present the award today.", "present", ["P", "R", "IY0", "Z", "EH1", "N", "T"]),
        ("The present was nice.", "present", ["P", "R", "EH1", "Z", "AH0", "N", "T"]),
        ("We read books every day.", "read", ["R", "IY1", "D"]),
        ("She read the letter yesterday.", "read", ["R", "EH1", "D"]),
    ],
)
def test_homographs_follow_pos(text, word, expected):
    tags = dict(english.pos_tags(text_normalize(text)))
    phones = clean_text_en(text)[0]
    assert any(phones[i : i + len(expected)] == expected for i in range(len(phones))), (tags[word], phones)


def test_short_english_gets_comma_and_upstream_quirks():
    assert clean_text_en("A.")[0] == [",", "EY1", "."]  # fewer than 4 phones: upstream pads with ","
    assert clean_text_en("OK.")[0] == ["OW1", "K", "EY1", "."]  # capitals are spelt
    assert text_normalize("is -3") == "isnegative three"  # the space goes with the minus (upstream)
    assert text_normalize("a；b，c") == "abc"  # upstream's escaped map removes these instead of mapping
    assert text_normalize("OpenAI") == "Open A I"


def test_runs_offline_without_nltk_or_g2p_en_import():
    code = (
        "import sys\n"
        "from dora_primespeech_mlx.text.english import clean_text_en\n"
        "print(clean_text_en('I will record 3 blorptastic songs, e.g. this one.')[0])\n"
        "bad = [m for m in ('nltk', 'g2p_en', 'textblob', 'textblob_aptagger') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)


def test_warm_up_frontend_loads_every_lazy_table_in_a_fresh_process():
    code = ("from dora_primespeech_mlx.text import english as en\n"
            "from dora_primespeech_mlx.text.frontend import warm_up_frontend\n"
            "names = ('_cmu', '_homographs', '_inflect', '_wordsegment', '_gru_weights')\n"
            "assert all(getattr(en, n).cache_info().currsize == 0 for n in names)\n"
            "warm_up_frontend()\n"
            "print([n for n in names if getattr(en, n).cache_info().currsize != 1])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout
