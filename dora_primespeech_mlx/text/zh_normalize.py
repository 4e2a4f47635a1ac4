"""Chinese text normalisation: digits, dates, times, units, phone numbers... spelled out in hanzi.

Behaviourally equal to upstream GPT-SoVITS's PaddleSpeech-derived ``text/zh_normalization``
(gpt-sovits-cpufast 0.1.0), quirks included (e.g. ``replace_measure`` rewrites every ``m``/``s``,
``-`` between numbers is read as 减 before phone numbers are seen, a time range's second half says
半 when the *first* minute is 30). The GPT was trained on that output, so the quirks are the spec;
``tests/test_text_zh.py`` checks it against the upstream code.

Entry point: :func:`normalize` → list of normalised sentences.
"""

from __future__ import annotations

import re
import string

from .symbols import load_json

__all__ = ["normalize", "normalize_sentence", "split_sentences", "num2str", "traditional_to_simplified"]

_DIGIT_NAMES = "零一二三四五六七八九"
# powers of ten that get a unit character, largest last
_UNITS = ((1, "十"), (2, "百"), (3, "千"), (4, "万"), (8, "亿"))


def _digit(ch: str) -> str:
    # \d in Python regexes also matches non-ASCII digits (e.g. Arabic-Indic); upstream then fails
    # with a KeyError, so we raise a clear error for the same inputs.
    i = "0123456789".find(ch)
    if i < 0 or len(ch) != 1:
        raise ValueError(f"cannot verbalise the digit {ch!r}: only ASCII and full-width digits 0-9 are supported")
    return _DIGIT_NAMES[i]


# ---------------------------------------------------------------------------------------------
# numbers


def verbalize_digit(digits: str, alt_one: bool = False) -> str:
    """Read digit by digit ("110" → 一一零, or 幺幺零 with ``alt_one``)."""
    out = "".join(_digit(c) for c in digits)
    return out.replace("一", "幺") if alt_one else out


def _cardinal_parts(value: str, use_zero: bool = True) -> list[str]:
    body = value.lstrip("0")
    if not body:
        return []
    if len(body) == 1:
        # a leading zero that was stripped is read (e.g. the "05" in 105 → 一百零五)
        return [_DIGIT_NAMES[0], _digit(body)] if use_zero and len(body) < len(value) else [_digit(body)]
    power, unit = [(p, u) for p, u in _UNITS if p < len(body)][-1]
    return _cardinal_parts(value[:-power]) + [unit] + _cardinal_parts(value[-power:])


def verbalize_cardinal(value: str) -> str:
    """Read an integer string as a number ("1200" → 一千二百, "12" → 十二, "000" → 零)."""
    if not value:
        return ""
    value = value.lstrip("0")
    if not value:
        return _DIGIT_NAMES[0]
    parts = _cardinal_parts(value)
    if len(parts) >= 2 and parts[0] == "一" and parts[1] == "十":
        parts = parts[1:]  # 一十二 is said 十二
    return "".join(parts)


def num2str(value: str) -> str:
    """Read a non-negative decimal string ("3.50" → 三点五零, ".5" → 零点五)."""
    pieces = value.split(".")
    if len(pieces) > 2:
        raise ValueError(f"cannot read the number {value!r}: it has more than one decimal point")
    integer, decimal = (pieces[0], "") if len(pieces) == 1 else pieces
    out = verbalize_cardinal(integer)
    # trailing zeros collapse to one kept zero ("3.500" → 三点五零), otherwise are dropped
    decimal = decimal.rstrip("0") + "0" if decimal.endswith("0") else decimal.rstrip("0")
    if decimal:
        out = (out or "零") + "点" + verbalize_digit(decimal)
    return out


def _signed(sign: str, number: str, negative_word: str = "负") -> str:
    return (negative_word if sign else "") + num2str(number)


# the number patterns share one group layout: 1 sign, 2 number, 5 a bare ".5" style decimal
_NUM = r"(-?)((\d+)(\.\d+)?)|(\.(\d+))"
RE_NUMBER = re.compile(_NUM)
RE_DECIMAL_NUM = re.compile(r"(-?)((\d+)(\.\d+))|(\.(\d+))")


def _read_number(m: re.Match) -> str:
    if m.group(5):
        return num2str(m.group(5))
    return _signed(m.group(1), m.group(2))


RE_FRAC = re.compile(r"(-?)(\d+)/(\d+)")


def _read_frac(m: re.Match) -> str:
    return ("负" if m.group(1) else "") + f"{num2str(m.group(3))}分之{num2str(m.group(2))}"


RE_PERCENTAGE = re.compile(r"(-?)(\d+(\.\d+)?)%")


def _read_percentage(m: re.Match) -> str:
    return ("负" if m.group(1) else "") + "百分之" + num2str(m.group(2))


RE_INTEGER = re.compile(r"(-)(\d+)")  # a negative integer


def _read_negative(m: re.Match) -> str:
    return _signed(m.group(1), m.group(2))


RE_DEFAULT_NUM = re.compile(r"\d{3}\d*")  # 3+ bare digits: an id, read digit by digit


def _read_default(m: re.Match) -> str:
    return verbalize_digit(m.group(0), alt_one=True)


_SUP = "⁰¹²³⁴⁵⁶⁷⁸⁹ˣʸⁿ"
_ASMD_OPERAND = rf"((-?)((\d+)(\.\d+)?[{_SUP}]*)|(\.\d+[{_SUP}]*)|([A-Za-z][{_SUP}]*))"
RE_ASMD = re.compile(_ASMD_OPERAND + r"([+\-×÷=])" + _ASMD_OPERAND)  # groups: 1 left, 8 op, 9 right
_ASMD_WORDS = {"+": "加", "-": "减", "×": "乘", "÷": "除", "=": "等于"}


def _read_asmd(m: re.Match) -> str:
    return m.group(1) + _ASMD_WORDS[m.group(8)] + m.group(9)


RE_POWER = re.compile(f"[{_SUP}]+")
_SUP_PLAIN = dict(zip(_SUP, "0123456789xyn"))


def _read_power(m: re.Match) -> str:
    return "的" + "".join(_SUP_PLAIN[c] for c in m.group(0)) + "次方"


# measure words after which a count is said 两 rather than 二 (upstream's list, duplicates kept)
_QUANTIFIERS = (
    "(处|台|架|枚|趟|幅|平|方|堵|间|床|株|批|项|例|列|篇|栋|注|亩|封|艘|把|目|套|段|人|所|朵|匹|张|座|回|场|尾|条|个|"
    "首|阙|阵|网|炮|顶|丘|棵|只|支|袭|辆|挑|担|颗|壳|窠|曲|墙|群|腔|砣|座|客|贯|扎|捆|刀|令|打|手|罗|坡|山|岭|江|溪|"
    "钟|队|单|双|对|出|口|头|脚|板|跳|枝|件|贴|针|线|管|名|位|身|堂|课|本|页|家|户|层|丝|毫|厘|分|钱|两|斤|担|铢|石|"
    "钧|锱|忽|(千|毫|微)克|毫|厘|(公)分|分|寸|尺|丈|里|寻|常|铺|程|(千|分|厘|毫|微)米|米|撮|勺|合|升|斗|石|盘|碗|碟|"
    "叠|桶|笼|盆|盒|杯|钟|斛|锅|簋|篮|盘|桶|罐|瓶|壶|卮|盏|箩|箱|煲|啖|袋|钵|年|月|日|季|刻|时|周|天|秒|分|小时|旬|"
    "纪|岁|世|更|夜|春|夏|秋|冬|代|伏|辈|丸|泡|粒|颗|幢|堆|条|根|支|道|面|片|张|颗|块|元|(亿|千万|百万|万|千|百)|"
    "(亿|千万|百万|万|千|百|美|)元|(亿|千万|百万|万|千|百|十|)吨|(亿|千万|百万|万|千|百|)块|角|毛|分)"
)
RE_POSITIVE_QUANTIFIERS = re.compile(r"(\d+)([多余几+])?" + _QUANTIFIERS)


def _read_quantified(m: re.Match) -> str:
    number = num2str(m.group(1))
    approx = "多" if m.group(2) == "+" else (m.group(2) or "")
    return ("两" if number == "二" else number) + approx + m.group(3)


_OPS = r"\d+\-×÷="
RE_RANGE = re.compile(rf"(?<![{_OPS}])((-?)((\d+)(\.\d+)?))[-~]((-?)((\d+)(\.\d+)?))(?![{_OPS}])")


def _read_range(m: re.Match) -> str:
    return RE_NUMBER.sub(_read_number, m.group(1)) + "到" + RE_NUMBER.sub(_read_number, m.group(6))


_RANGE_UNITS = r"(%|°C|℃|度|摄氏度|cm2|cm²|cm3|cm³|cm|db|ds|kg|km|m2|m²|m³|m3|ml|m|mm|s)"
RE_TO_RANGE = re.compile(rf"({_NUM}){_RANGE_UNITS}[~]({_NUM}){_RANGE_UNITS}")


def _read_to_range(m: re.Match) -> str:
    return m.group(0).replace("~", "至")


RE_VERSION_NUM = re.compile(r"((\d+)(\.\d+)(\.\d+)?(\.\d+)+)")


def _read_version(m: re.Match) -> str:
    return "".join("点" if c == "." else num2str(c) for c in m.group(1))


# ---------------------------------------------------------------------------------------------
# dates and times

RE_DATE = re.compile(r"(\d{4}|\d{2})年((0?[1-9]|1[0-2])月)?(((0?[1-9])|((1|2)[0-9])|30|31)([日号]))?")


def _read_date(m: re.Match) -> str:
    year, month, day = m.group(1), m.group(3), m.group(5)
    out = verbalize_digit(year) + "年" if year else ""
    if month:
        out += verbalize_cardinal(month) + "月"
    if day:
        out += verbalize_cardinal(day) + m.group(9)
    return out


RE_DATE2 = re.compile(r"(\d{4})([- /.])(0[1-9]|1[012])\2(0[1-9]|[12][0-9]|3[01])")


def _read_date2(m: re.Match) -> str:
    return f"{verbalize_digit(m.group(1))}年{verbalize_cardinal(m.group(3))}月{verbalize_cardinal(m.group(4))}日"


_CLOCK = r"([0-1]?[0-9]|2[0-3]):([0-5][0-9])(:([0-5][0-9]))?"
RE_TIME = re.compile(_CLOCK)
RE_TIME_RANGE = re.compile(_CLOCK + r"(~|-)" + _CLOCK)


def _clock_part(value: str) -> str:
    out = num2str(value.lstrip("0"))
    return "零" + out if value.startswith("0") else out


def _read_time(m: re.Match) -> str:
    hour, minute, second = m.group(1), m.group(2), m.group(4)
    out = num2str(hour) + "点"
    if minute.lstrip("0"):
        out += "半" if int(minute) == 30 else _clock_part(minute) + "分"
    if second and second.lstrip("0"):
        out += _clock_part(second) + "秒"
    if m.re is RE_TIME_RANGE:
        hour2, minute2, second2 = m.group(6), m.group(7), m.group(9)
        out += "至" + num2str(hour2) + "点"
        if minute2.lstrip("0"):
            # upstream tests the first minute here, so "8:30-9:15" ends in 九点半
            out += "半" if int(minute) == 30 else _clock_part(minute2) + "分"
        if second2 and second2.lstrip("0"):
            out += _clock_part(second2) + "秒"
    return out


# ---------------------------------------------------------------------------------------------
# phone numbers, temperatures, units

RE_MOBILE_PHONE = re.compile(r"(?<!\d)((\+?86 ?)?1([38]\d|5[0-35-9]|7[678]|9[89])\d{8})(?!\d)")
RE_TELEPHONE = re.compile(r"(?<!\d)((0(10|2[1-3]|[3-9]\d{2})-?)?[1-9]\d{6,7})(?!\d)")
RE_NATIONAL_UNIFORM_NUMBER = re.compile(r"(400)(-)?\d{3}(-)?\d{4}")


def _read_mobile(m: re.Match) -> str:
    return "，".join(verbalize_digit(p, alt_one=True) for p in m.group(0).strip("+").split())


def _read_landline(m: re.Match) -> str:
    return "，".join(verbalize_digit(p, alt_one=True) for p in m.group(0).split("-"))


RE_TEMPERATURE = re.compile(r"(-?)(\d+(\.\d+)?)(°C|℃|度|摄氏度)")


def _read_temperature(m: re.Match) -> str:
    unit = "摄氏度" if m.group(4) == "摄氏度" else "度"
    return ("零下" if m.group(1) else "") + num2str(m.group(2)) + unit


# Plain substring replacement in this order, as upstream does (so "mm" becomes 米米 and any "s" 秒).
_MEASURES = (
    ("cm2", "平方厘米"), ("cm²", "平方厘米"), ("cm3", "立方厘米"), ("cm³", "立方厘米"), ("cm", "厘米"),
    ("db", "分贝"), ("ds", "毫秒"), ("kg", "千克"), ("km", "千米"), ("m2", "平方米"), ("m²", "平方米"),
    ("m³", "立方米"), ("m3", "立方米"), ("ml", "毫升"), ("m", "米"), ("mm", "毫米"), ("s", "秒"),
)  # fmt: skip


def _replace_measures(s: str) -> str:
    for unit, word in _MEASURES:
        s = s.replace(unit, word)
    return s


# ---------------------------------------------------------------------------------------------
# characters

# Full-width letters and digits to ASCII. Upstream also "maps" U+3000 to a space, but with a str
# key that str.translate never looks up, so the ideographic space is kept (and dropped later).
_FULLWIDTH = {ord(c) + 0xFEE0: ord(c) for c in string.ascii_letters + string.digits}


def traditional_to_simplified(text: str) -> str:
    """Map traditional characters to simplified ones with upstream's character table."""
    t2s = load_json("zh_t2s.json")
    return "".join(t2s.get(c, c) for c in text)


_CIRCLED = dict(zip("①②③④⑤⑥⑦⑧⑨⑩", "一二三四五六七八九十"))
_GREEK = (
    ("α", "阿尔法"), ("β", "贝塔"), ("γ", "伽玛"), ("Γ", "伽玛"), ("δ", "德尔塔"), ("Δ", "德尔塔"), ("ε", "艾普西龙"),
    ("ζ", "捷塔"), ("η", "依塔"), ("θ", "西塔"), ("Θ", "西塔"), ("ι", "艾欧塔"), ("κ", "喀帕"), ("λ", "拉姆达"),
    ("Λ", "拉姆达"), ("μ", "缪"), ("ν", "拗"), ("ξ", "克西"), ("Ξ", "克西"), ("ο", "欧米克伦"), ("π", "派"),
    ("Π", "派"), ("ρ", "肉"), ("ς", "西格玛"), ("Σ", "西格玛"), ("σ", "西格玛"), ("τ", "套"), ("υ", "宇普西龙"),
    ("φ", "服艾"), ("Φ", "服艾"), ("χ", "器"), ("ψ", "普赛"), ("Ψ", "普赛"), ("ω", "欧米伽"), ("Ω", "欧米伽"),
)  # fmt: skip
_LEFTOVER_OPS = (("+", "加"), ("-", "减"), ("×", "乘"), ("÷", "除"), ("=", "等"))
_SPLIT_DROP = re.compile(r"[——《》【】<>{}()（）#&@“”^_|\\]")
_POST_DROP = re.compile(r"[-——《》【】<=>{}()（）#&@“”^_|\\]")


def _post_replace(s: str) -> str:
    s = s.replace("/", "每")
    for a, b in _CIRCLED.items():
        s = s.replace(a, b)
    for a, b in _GREEK:
        s = s.replace(a, b)
    for a, b in _LEFTOVER_OPS:
        s = s.replace(a, b)
    return _POST_DROP.sub("", s)


# ---------------------------------------------------------------------------------------------
# pipeline

_SENTENCE_END = re.compile(r"([：、，；。？！,;?!][”’]?)")

# (pattern, replacement) in upstream's order; the arithmetic rule is applied until it stops matching
_RULES: tuple[tuple[re.Pattern, object], ...] = (
    (RE_DATE, _read_date),
    (RE_DATE2, _read_date2),
    (RE_TIME_RANGE, _read_time),
    (RE_TIME, _read_time),
    (RE_TO_RANGE, _read_to_range),
    (RE_TEMPERATURE, _read_temperature),
)
_RULES_AFTER_ASMD: tuple[tuple[re.Pattern, object], ...] = (
    (RE_POWER, _read_power),
    (RE_FRAC, _read_frac),
    (RE_PERCENTAGE, _read_percentage),
    (RE_MOBILE_PHONE, _read_mobile),
    (RE_TELEPHONE, _read_landline),
    (RE_NATIONAL_UNIFORM_NUMBER, _read_landline),
    (RE_RANGE, _read_range),
    (RE_INTEGER, _read_negative),
    (RE_VERSION_NUM, _read_version),
    (RE_DECIMAL_NUM, _read_number),
    (RE_POSITIVE_QUANTIFIERS, _read_quantified),
    (RE_DEFAULT_NUM, _read_default),
    (RE_NUMBER, _read_number),
)


def split_sentences(text: str) -> list[str]:
    """Drop spaces and bracket-like symbols, then cut after each sentence-ending mark."""
    text = _SPLIT_DROP.sub("", text.replace(" ", ""))
    text = _SENTENCE_END.sub("\\1\n", text).strip()
    return [s.strip() for s in re.split(r"\n+", text)]


def normalize_sentence(sentence: str) -> str:
    """Spell out one sentence's numbers, dates, units and symbols in hanzi."""
    s = traditional_to_simplified(sentence).translate(_FULLWIDTH)
    for pattern, repl in _RULES:
        s = pattern.sub(repl, s)
    s = _replace_measures(s)
    while RE_ASMD.search(s):
        s = RE_ASMD.sub(_read_asmd, s)
    for pattern, repl in _RULES_AFTER_ASMD:
        s = pattern.sub(repl, s)
    return _post_replace(s)


def normalize(text: str) -> list[str]:
    """Split ``text`` into sentences and normalise each (upstream ``TextNormalizer.normalize``)."""
    return [normalize_sentence(s) for s in split_sentences(text)]
