"""Answer-checking rewards for text answers: exact match and math final answers.

`math` extracts the final answer of a response — the last `\\boxed{...}` (or `\\fbox{}`), else the
text after the last `####` (GSM8K), else "answer is X" / "answer: X", else (optionally) the last
number; after `####` and "answer is", a number followed by words ("is: 72 apples.") counts as the
number — and compares it with the reference answer (itself extracted the same way when it is a
GSM8K solution) by value when both parse as numbers: thousands commas, `$`, `%`, trailing `.0`,
`\\frac{a}{b}`, `a/b` and decimals are normalised, so `1,000` = `1000.0` and `0.5` = `1/2`.
Otherwise the normalised strings must be equal.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

from dora.rewards.registry import RewardResult, register

_ANSWER_IS = re.compile(r"(?:final answer|answer)\s*(?:is|:|=)\s*(.+)", re.IGNORECASE)
# A number leading an answer phrase ("72 apples", "1,000 dollars", "3/4 cup"), not one that starts an
# expression ("2x+1"): it must be followed by a space, punctuation or the end.
_LEADING_NUMBER = re.compile(r"\$?\s*(-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?)(?=[\s.,;:!?)*]|$)")
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_FRACTION = re.compile(r"([+-]?(?:\d+(?:\.\d+)?))\s*/\s*([+-]?(?:\d+(?:\.\d+)?))")
_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (nested braces allowed), or None."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0 or text[start:i].strip() not in ("\\boxed", "\\fbox"):
        rest = text[start:].split(None, 1)  # "\boxed 5" form
        return rest[1].split("$")[0].strip() if len(rest) == 2 else None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j].strip()
    return None  # unbalanced: no answer


def extract_answer(text: str, *, fallback_last_number: bool = True) -> tuple[str | None, str]:
    """(final answer, how it was found: boxed | hashes | answer_is | last_number | none)."""
    if "\\boxed" in text or "\\fbox" in text:
        # A response that boxes its answer but is cut off mid-box has no answer: do not fall back.
        boxed = last_boxed(text)
        return boxed, "boxed" if boxed is not None else "none"
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        return (_answer_phrase(tail.splitlines()[0]) if tail else None), "hashes"
    matches = _ANSWER_IS.findall(text)
    if matches:
        return _answer_phrase(matches[-1]), "answer_is"
    if fallback_last_number:
        numbers = _NUMBER.findall(text)
        if numbers:
            return numbers[-1], "last_number"
    return None, "none"


def _answer_phrase(text: str) -> str:
    """What follows "answer is" / "####", without the punctuation and markdown around it and, when it
    is a number followed by words ("72 apples."), without the words."""
    text = text.strip().lstrip(":=*").strip().rstrip(".").strip()
    if parse_number(text) is None and (m := _LEADING_NUMBER.match(text)):
        return m.group(1)
    return text


def _strip_markup(text: str) -> str:
    text = _TEXT.sub(r"\1", text)
    for token in ("\\!", "\\,", "\\;", "\\ ", "\\left", "\\right", "\\$", "$", "\\(", "\\)", "\\%", "%"):
        text = text.replace(token, "")
    return text.strip().rstrip(".").strip()


def parse_number(text: str) -> Fraction | None:
    """The exact value of a simple numeric answer, or None if it is not one."""
    t = _strip_markup(text)
    t = _LATEX_FRAC.sub(r"(\1)/(\2)", t).replace("(", "").replace(")", "").replace(" ", "")
    if _THOUSANDS.fullmatch(t):
        t = t.replace(",", "")
    if _DECIMAL.fullmatch(t):
        return Fraction(t)
    m = _FRACTION.fullmatch(t)
    if m and Fraction(m.group(2)) != 0:
        return Fraction(m.group(1)) / Fraction(m.group(2))
    return None


def normalize_text(text: str) -> str:
    return re.sub(r"\s+", "", _strip_markup(text)).lower()


def answers_match(predicted: str, reference: str) -> bool:
    a, b = parse_number(predicted), parse_number(reference)
    if a is not None and b is not None:
        return a == b
    return normalize_text(predicted) == normalize_text(reference)


def reference_answer(answer: Any) -> str:
    """The final answer inside a reference: a GSM8K solution's `#### X`, a `\\boxed{X}`, or the whole text."""
    text = str(answer)
    if "####" in text or "\\boxed" in text or "\\fbox" in text:
        found, _ = extract_answer(text, fallback_last_number=False)
        if found is not None:
            return found
    return text.strip()


@register("exact_match", inline=True)
def exact_match(response: str, answer: Any, meta: dict[str, Any], *, case_sensitive: bool = True) -> RewardResult:
    """1.0 when the response, stripped of surrounding whitespace, equals the answer."""
    got, want = response.strip(), str(answer).strip()
    if not case_sensitive:
        got, want = got.lower(), want.lower()
    return RewardResult(float(got == want), {})


@register("math", inline=True)
def math_answer(response: str, answer: Any, meta: dict[str, Any], *, fallback_last_number: bool = True,
                format_credit: float = 0.0) -> RewardResult:
    """1.0 for the right final answer; `format_credit` for a wrong answer given in an explicit
    format (boxed, ####, "answer is"); 0 otherwise."""
    if not 0.0 <= format_credit < 1.0:
        raise ValueError(f"reward.options.format_credit must be in [0, 1), got {format_credit}")
    reference = reference_answer(answer)
    predicted, how = extract_answer(response, fallback_last_number=fallback_last_number)
    info = {"extracted": predicted, "reference": reference, "found_by": how}
    if predicted is None:
        return RewardResult(0.0, info)
    if answers_match(predicted, reference):
        return RewardResult(1.0, info)
    return RewardResult(format_credit if how in ("boxed", "hashes", "answer_is") else 0.0, info)
