"""Mandarin tone sandhi on jieba-segmented words: 不, 一, neutral tones and third-tone chains.

Behaviourally equal to upstream GPT-SoVITS ``text/tone_sandhi.py`` (gpt-sovits-cpufast 0.1.0, a
PaddleSpeech derivative), including its word-merging heuristics and the exceptions it swallows.
Finals are pypinyin ``FINALS_TONE3`` strings with the tone digit last (``"ao3"``, neutral ``"5"``).
"""

from __future__ import annotations

import logging

from pypinyin import Style, lazy_pinyin

from .symbols import load_json

logger = logging.getLogger(__name__)

Seg = list[list[str]]  # [[word, pos], ...]

_PUNC = "：，；。？！“”‘’':,;.?!"
_NEUTRAL_PARTICLES = "吧呢哈啊呐噻嘛吖嗨呐哦哒额滴哩哟喽啰耶喔诶"


def _retone(final: str, tone: str) -> str:
    return final[:-1] + tone


def _all_third(finals: list[str]) -> bool:
    return all(f[-1] == "3" for f in finals)


def _finals(word: str) -> list[str]:
    return lazy_pinyin(word, neutral_tone_with_five=True, style=Style.FINALS_TONE3)


class ToneSandhi:
    """Word merging before, and tone changes after, pinyin lookup.

    Args:
        tokenizer: a ``jieba.Tokenizer`` (its ``cut_for_search`` splits 3-character words).
    """

    def __init__(self, tokenizer) -> None:
        words = load_json("zh_words.json")
        self.must_neutral = frozenset(words["must_neural_tone_words"])
        self.must_not_neutral = frozenset(words["must_not_neural_tone_words"])
        self._tokenizer = tokenizer

    # -- tone changes ------------------------------------------------------------------------

    def modified_tone(self, word: str, pos: str, finals: list[str]) -> list[str]:
        """Apply 不, 一, neutral-tone and third-tone rules to one word's finals, in that order."""
        finals = self._bu(word, finals)
        finals = self._yi(word, finals)
        finals = self._neutral(word, pos, finals)
        return self._third(word, finals)

    def _split_word(self, word: str) -> list[str]:
        # the shortest search-mode sub-word, and the rest of the word on its other side
        parts = sorted(self._tokenizer.cut_for_search(word), key=len)
        head = parts[0]
        if word.find(head) == 0:
            return [head, word[len(head) :]]
        return [word[: -len(head)], head]

    def _neutral(self, word: str, pos: str, finals: list[str]) -> list[str]:
        # reduplicated nouns/verbs/adjectives: 奶奶, 试试
        for j in range(1, len(word)):
            if word[j] == word[j - 1] and pos[0] in "nva" and word not in self.must_not_neutral:
                finals[j] = _retone(finals[j], "5")
        ge = word.find("个")
        last = word[-1] if word else ""
        if last and last in _NEUTRAL_PARTICLES:
            finals[-1] = _retone(finals[-1], "5")
        elif last and last in "的地得":
            finals[-1] = _retone(finals[-1], "5")
        elif len(word) == 1 and word in "了着过" and pos in ("ul", "uz", "ug"):
            finals[-1] = _retone(finals[-1], "5")
        elif len(word) > 1 and last in "们子" and pos in ("r", "n") and word not in self.must_not_neutral:
            finals[-1] = _retone(finals[-1], "5")
        elif len(word) > 1 and last in "上下里" and pos in ("s", "l", "f"):  # 桌上, 地下, 家里
            finals[-1] = _retone(finals[-1], "5")
        elif len(word) > 1 and last in "来去" and word[-2] in "上下进出回过起开":  # 上来, 下去
            finals[-1] = _retone(finals[-1], "5")
        elif (ge >= 1 and (word[ge - 1].isnumeric() or word[ge - 1] in "几有两半多各整每做是")) or word == "个":
            finals[ge] = _retone(finals[ge], "5")  # 个 as a measure word
        elif word in self.must_neutral or word[-2:] in self.must_neutral:
            finals[-1] = _retone(finals[-1], "5")

        parts = self._split_word(word)
        cut = len(parts[0])
        halves = [finals[:cut], finals[cut:]]
        for i, part in enumerate(parts):
            if part in self.must_neutral or part[-2:] in self.must_neutral:
                halves[i][-1] = _retone(halves[i][-1], "5")
        return halves[0] + halves[1]

    def _bu(self, word: str, finals: list[str]) -> list[str]:
        if len(word) == 3 and word[1] == "不":  # 看不懂
            finals[1] = _retone(finals[1], "5")
            return finals
        for i, ch in enumerate(word):
            if ch == "不" and i + 1 < len(word) and finals[i + 1][-1] == "4":  # 不怕 → bu2
                finals[i] = _retone(finals[i], "2")
        return finals

    def _yi(self, word: str, finals: list[str]) -> list[str]:
        if "一" in word and all(c.isnumeric() for c in word if c != "一"):
            return finals  # a digit string such as 一零零
        if len(word) == 3 and word[1] == "一" and word[0] == word[-1]:  # 看一看
            finals[1] = _retone(finals[1], "5")
        elif word.startswith("第一"):  # ordinal
            finals[1] = _retone(finals[1], "1")
        else:
            for i, ch in enumerate(word):
                if ch == "一" and i + 1 < len(word):
                    if finals[i + 1][-1] == "4":  # 一段 → yi2
                        finals[i] = _retone(finals[i], "2")
                    elif word[i + 1] not in _PUNC:  # 一天 → yi4; before punctuation it stays yi1
                        finals[i] = _retone(finals[i], "4")
        return finals

    def _third(self, word: str, finals: list[str]) -> list[str]:
        if len(word) == 2 and _all_third(finals):
            finals[0] = _retone(finals[0], "2")
        elif len(word) == 3:
            parts = self._split_word(word)
            if _all_third(finals):
                if len(parts[0]) == 2:  # 蒙古/包
                    finals[0] = _retone(finals[0], "2")
                    finals[1] = _retone(finals[1], "2")
                elif len(parts[0]) == 1:  # 纸/老虎
                    finals[1] = _retone(finals[1], "2")
            else:
                cut = len(parts[0])
                halves = [finals[:cut], finals[cut:]]
                for i, sub in enumerate(halves):
                    if _all_third(sub) and len(sub) == 2:  # 所有/人
                        sub[0] = _retone(sub[0], "2")
                    elif i == 1 and not _all_third(sub) and sub[0][-1] == "3" and halves[0][-1][-1] == "3":
                        halves[0][-1] = _retone(halves[0][-1], "2")  # 好/喜欢
                finals = halves[0] + halves[1]
        elif len(word) == 4:  # idioms: two 2-character halves
            out: list[str] = []
            for sub in (finals[:2], finals[2:]):
                if _all_third(sub):
                    sub[0] = _retone(sub[0], "2")
                out += sub
            finals = out
        return finals

    # -- merging jieba's words before pinyin lookup ------------------------------------------

    def pre_merge_for_modify(self, seg: list[tuple[str, str]]) -> Seg:
        """Merge 不/一 with neighbours, reduplications, third-tone pairs and 儿 into single words."""
        merged = self._merge_bu(seg)
        merged = self._guarded(self._merge_yi, merged)
        merged = self._merge_reduplication(merged)
        merged = self._guarded(self._merge_third, merged)
        merged = self._guarded(self._merge_third_edge, merged)
        return self._merge_er(merged)

    @staticmethod
    def _guarded(step, seg: Seg) -> Seg:
        # upstream wraps these steps in a bare try/except and keeps the previous segmentation on
        # any error (e.g. a syllable whose pypinyin final is empty); reproduced deliberately
        try:
            return step(seg)
        except Exception as e:  # noqa: BLE001 - upstream parity, see above
            logger.debug("%s failed (%r); keeping the previous segmentation", step.__name__, e)
            return seg

    @staticmethod
    def _merge_bu(seg: list[tuple[str, str]]) -> Seg:
        out: Seg = []
        prev = ""
        for word, pos in seg:
            if prev == "不":
                word = prev + word
            if word != "不":
                out.append([word, pos])
            prev = word
        if prev == "不":
            out.append([prev, "d"])
        return out

    @staticmethod
    def _merge_yi(seg: Seg) -> Seg:
        # 1) verb 一 verb → one word (听一听)
        out: Seg = []
        i = 0
        while i < len(seg):
            word, pos = seg[i]
            if i >= 1 and word == "一" and i + 1 < len(seg):
                last = out[-1] if out else seg[i - 1]
                nxt = seg[i + 1]
                if last[0] == nxt[0] and last[1] == "v" and nxt[1] == "v":
                    out[-1] = [last[0] + "一" + nxt[0], last[1]]
                    i += 2
                    continue
            out.append([word, pos])
            i += 1
        # 2) a lone 一 absorbs the next word
        seg, out = out, []
        for word, pos in seg:
            if out and out[-1][0] == "一":
                out[-1][0] += word
            else:
                out.append([word, pos])
        return out

    @staticmethod
    def _merge_reduplication(seg: Seg) -> Seg:
        out: Seg = []
        for word, pos in seg:
            if out and word == out[-1][0]:
                out[-1][0] += word
            else:
                out.append([word, pos])
        return out

    @staticmethod
    def _merge_third(seg: Seg) -> Seg:
        # two neighbouring all-third-tone words, at most 3 characters together
        finals = [_finals(w) for w, _ in seg]
        return ToneSandhi._merge_pairs(seg, lambda i: _all_third(finals[i - 1]) and _all_third(finals[i]))

    @staticmethod
    def _merge_third_edge(seg: Seg) -> Seg:
        # the previous word ends and this one starts with a third tone
        finals = [_finals(w) for w, _ in seg]
        return ToneSandhi._merge_pairs(seg, lambda i: finals[i - 1][-1][-1] == "3" and finals[i][0][-1] == "3")

    @staticmethod
    def _merge_pairs(seg: Seg, joinable) -> Seg:
        out: Seg = []
        took = [False] * len(seg)
        for i, (word, pos) in enumerate(seg):
            if i >= 1 and joinable(i) and not took[i - 1]:
                prev = seg[i - 1][0]
                # a reduplication stays alone: it needs the neutral-tone rule
                if not (len(prev) == 2 and prev[0] == prev[1]) and len(prev) + len(word) <= 3:
                    out[-1][0] += word
                    took[i] = True
                    continue
            out.append([word, pos])
        return out

    @staticmethod
    def _merge_er(seg: Seg) -> Seg:
        out: Seg = []
        for i, (word, pos) in enumerate(seg):
            if i >= 1 and word == "儿" and seg[i - 1][0] != "#":
                out[-1][0] += word
            else:
                out.append([word, pos])
        return out
