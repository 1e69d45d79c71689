"""Verifiers of the built-in synthetic tasks (`dora.data.tasks`), with optional partial credit.

A correct final answer scores 1.0. With `partial_credit = p > 0` a wrong answer scores at most p:
- arithmetic: a well-formed scratchpad (`x+y[+c]=s,...|result`) with a wrong result scores
  `p * (1 + f) / 2`, f = fraction of columns that match the reference scratchpad; malformed = 0;
- reverse: `p * f`, f = fraction of positions holding the right letter;
- countdown: an expression that uses only the given numbers (each at most once) but misses the
  target scores `p * (1 + c) / 2`, c = max(0, 1 - |value - target| / target); anything else 0.
`synthetic` dispatches on `meta["task"]`, so one reward serves a mix of tasks.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from typing import Any

from dora.data.tasks import ANSWER_MARK, STEP_SEP, arithmetic_steps
from dora.rewards.registry import RewardResult, register

_COLUMN = r"\d[+*]\d(?:\+\d)?=\d{1,2}"
_ARITHMETIC = re.compile(rf"({_COLUMN}(?:{STEP_SEP}{_COLUMN})*){re.escape(ANSWER_MARK)}(\d+)")


def _check_credit(partial_credit: float) -> None:
    if not 0.0 <= partial_credit < 1.0:
        raise ValueError(f"reward.options.partial_credit must be in [0, 1), got {partial_credit}")


@register("arithmetic", inline=True)
def arithmetic(response: str, answer: Any, meta: dict[str, Any], *, partial_credit: float = 0.0) -> RewardResult:
    _check_credit(partial_credit)
    match = _ARITHMETIC.fullmatch(response.strip())
    if match is None:
        return RewardResult(0.0, {"well_formed": False})
    result = match.group(2)
    if result == str(answer):
        return RewardResult(1.0, {"well_formed": True, "result": result})
    info: dict[str, Any] = {"well_formed": True, "result": result}
    if partial_credit == 0.0:
        return RewardResult(0.0, info)
    missing = [k for k in ("a", "b", "op") if k not in meta]
    if missing:
        raise ValueError(f"arithmetic partial credit needs meta {missing} (rows from dora.data.tasks carry them)")
    expected = arithmetic_steps(meta["a"], meta["b"], meta["op"])
    written = match.group(1).split(STEP_SEP)
    info["steps_correct"] = sum(w == e for w, e in zip(written, expected)) / max(len(expected), len(written))
    return RewardResult(partial_credit * (1 + info["steps_correct"]) / 2, info)


@register("reverse", inline=True)
def reverse(response: str, answer: Any, meta: dict[str, Any], *, partial_credit: float = 0.0) -> RewardResult:
    _check_credit(partial_credit)
    got, want = response.strip(), str(answer)
    if got == want:
        return RewardResult(1.0, {})
    positions = sum(a == b for a, b in zip(got, want)) / max(len(got), len(want), 1)
    return RewardResult(partial_credit * positions, {"positions_correct": positions})


_EXPRESSION_CHARS = re.compile(r"[0-9+\-*() ]{1,200}")
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b}


def evaluate_expression(text: str) -> tuple[int, list[int]] | None:
    """(value, numbers used) of an integer `+ - *` expression, or None if it is not one."""
    if not _EXPRESSION_CHARS.fullmatch(text):
        return None  # only digits, operators, parentheses: nothing else reaches the parser
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError:
        return None
    used: list[int] = []

    def value(node: ast.AST) -> int | None:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = value(node.left), value(node.right)
            return None if left is None or right is None else _OPS[type(node.op)](left, right)
        return None

    result = value(tree)
    return None if result is None else (result, used)


@register("countdown", inline=True)
def countdown(response: str, answer: Any, meta: dict[str, Any], *, partial_credit: float = 0.0) -> RewardResult:
    _check_credit(partial_credit)
    if "numbers" not in meta:
        raise ValueError("countdown reward needs meta['numbers'] (rows from dora.data.tasks carry them)")
    target = int(answer)
    evaluated = evaluate_expression(response.strip())
    if evaluated is None:
        return RewardResult(0.0, {"valid": False})
    result, used = evaluated
    if Counter(used) - Counter(meta["numbers"]):  # a number not given, or used too often
        return RewardResult(0.0, {"valid": False, "value": result})
    if result == target:
        return RewardResult(1.0, {"valid": True, "value": result})
    closeness = max(0.0, 1.0 - abs(result - target) / max(abs(target), 1))
    return RewardResult(partial_credit * (1 + closeness) / 2, {"valid": True, "value": result})


_TASKS = {"arithmetic": arithmetic, "reverse": reverse, "countdown": countdown}


@register("synthetic", inline=True)
def synthetic(response: str, answer: Any, meta: dict[str, Any], **options: Any) -> RewardResult:
    task = meta.get("task")
    if task not in _TASKS:
        raise ValueError(f"synthetic reward: meta['task']={task!r} is not one of {sorted(_TASKS)}")
    return _TASKS[task](response, answer, meta, **options)
