"""Built-in synthetic tasks: checkable answers and response lengths with a long tail.

**arithmetic** (the default task): `a+b=` (or `a*d=` with one digit d) answered by a column-by-column
scratchpad, least significant digit first, then `|` and the result:

    prompt   "347+85="
    response "7+5=12,4+8+1=13,3+0+1=4|432"

Each column is `x+y=s`, or `x+y+c=s` when a carry c comes in; missing digits of the shorter operand
are written as 0 so every column has the same shape. For `*` the columns are `x*d=s` / `x*d+c=s`.
The response grows by ~7 characters per digit and operand lengths follow `DIGIT_WEIGHTS` (mostly
1-3 digits, rarely up to 12), so most responses are short and a few are long — the workload on
which a synchronous trainer waits for its slowest sample.

**reverse**: `rev:abc=` answered by `cba`; string lengths follow a long-tailed distribution.

**countdown**: `cd:3,7,25>46=` answered by an expression over some of the numbers (each used at most
once, `+ - *` and parentheses) whose value is the target, e.g. `(3*7)+25`.

Rows are generated deterministically from (seed, split, index) and the held-out prompts are
excluded from training by text, so the two splits never share a prompt. `reference_solution(row)`
gives the full response text, for the supervised warm start and the verifiers' partial credit.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from dora.data.config import DataConfig
from dora.data.datasets import DatasetSplits, Row, register_dataset

# Relative frequency of operand lengths 1..12 digits: mostly short, a thin tail to 12.
DIGIT_WEIGHTS = (30.0, 28.0, 18.0, 9.0, 5.0, 3.0, 2.0, 1.5, 1.2, 1.0, 0.7, 0.6)
ANSWER_MARK = "|"
STEP_SEP = ","
_TRAIN, _EVAL = 0, 1
_MAX_REDRAWS = 1000


def _rng(seed: int, split: int, index: int, attempt: int = 0) -> random.Random:
    # A tuple string seeds identically across processes and Python versions (str seeds hash via
    # SHA-512), unlike hash() of a tuple.
    return random.Random(f"{seed}/{split}/{index}/{attempt}")


def _digit_count(rng: random.Random, max_digits: int) -> int:
    weights = list(DIGIT_WEIGHTS[:max_digits]) + [DIGIT_WEIGHTS[-1]] * max(0, max_digits - len(DIGIT_WEIGHTS))
    return rng.choices(range(1, max_digits + 1), weights=weights)[0]


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def arithmetic_row(rng: random.Random, config: DataConfig) -> Row:
    op = rng.choice(config.operations)
    a = _number(rng, _digit_count(rng, config.max_digits))
    b = _number(rng, _digit_count(rng, config.max_digits)) if op == "+" else rng.randint(2, 9)
    result = a + b if op == "+" else a * b
    meta = {"task": "arithmetic", "op": op, "a": a, "b": b, "digits": max(len(str(a)), len(str(b)))}
    return Row(prompt=f"{a}{op}{b}=", answer=str(result), meta=meta)


def arithmetic_steps(a: int, b: int, op: str) -> list[str]:
    """The scratchpad columns of `a op b`, least significant first."""
    if op not in ("+", "*"):
        raise ValueError(f"arithmetic op must be '+' or '*', got {op!r}")
    digits_a = [int(c) for c in reversed(str(a))]
    if op == "+":
        digits_b = [int(c) for c in reversed(str(b))]
        width = max(len(digits_a), len(digits_b))
        digits_a += [0] * (width - len(digits_a))
        digits_b += [0] * (width - len(digits_b))
    steps, carry = [], 0
    for i, x in enumerate(digits_a):
        y = digits_b[i] if op == "+" else b
        total = x + y + carry if op == "+" else x * y + carry
        steps.append(f"{x}{op}{y}" + (f"+{carry}" if carry else "") + f"={total}")
        carry = total // 10
    return steps


def reverse_row(rng: random.Random, config: DataConfig) -> Row:
    # Geometric-like lengths: half the strings have <= 4 letters, a few reach max_string_length.
    length = min(config.max_string_length, 1 + int(rng.expovariate(1 / 5.0) ** 1.25))
    text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(length))
    return Row(prompt=f"rev:{text}=", answer=text[::-1], meta={"task": "reverse", "length": length})


def countdown_row(rng: random.Random, config: DataConfig) -> Row:
    # 2-4 numbers combined by a random expression tree; its value (1..1000) is the target.
    while True:
        count = rng.choices((2, 3, 4), weights=(4, 3, 2))[0]
        numbers = [rng.randint(1, 10) if rng.random() < 0.8 else rng.choice((25, 50, 75, 100)) for _ in range(count)]
        items = [(str(n), n) for n in numbers]  # (expression, value)
        while len(items) > 1:
            (left, a), (right, b) = (items.pop(rng.randrange(len(items))) for _ in range(2))
            op = rng.choice("+-*")
            if op == "-" and a < b:
                (left, a), (right, b) = (right, b), (left, a)
            items.append((f"({left}{op}{right})", a + b if op == "+" else a - b if op == "-" else a * b))
        expression, target = items[0]
        if 0 < target <= 1000:
            break
    numbers.sort()
    meta = {"task": "countdown", "numbers": numbers, "target": target, "solution": expression[1:-1]}
    return Row(prompt=f"cd:{','.join(map(str, numbers))}>{target}=", answer=str(target), meta=meta)


def reference_solution(row: Row) -> str:
    """The full response a perfect policy writes for a synthetic row (without the EOS token)."""
    task = row.meta.get("task")
    if task == "arithmetic":
        return STEP_SEP.join(arithmetic_steps(row.meta["a"], row.meta["b"], row.meta["op"])) + ANSWER_MARK + str(row.answer)
    if task == "reverse":
        return str(row.answer)
    if task == "countdown":
        return row.meta["solution"]
    raise ValueError(f"row {row.prompt!r} is not from a built-in synthetic task (meta.task={task!r})")


def synthetic_splits(make_row: Callable[[random.Random, DataConfig], Row], config: DataConfig) -> DatasetSplits:
    """`eval_size` distinct held-out prompts, then `train_size` training rows none of which is held out."""
    eval_rows: list[Row] = []
    seen: set[str] = set()
    index = 0
    while len(eval_rows) < config.eval_size:
        row = make_row(_rng(config.seed, _EVAL, index), config)
        index += 1
        if row.prompt not in seen:
            seen.add(row.prompt)
            eval_rows.append(row)
        if index > config.eval_size * _MAX_REDRAWS:
            raise ValueError(f"cannot draw {config.eval_size} distinct held-out prompts (data.eval_size too large"
                             " for this task's settings)")
    train_rows: list[Row] = []
    for i in range(config.train_size):
        for attempt in range(_MAX_REDRAWS):
            row = make_row(_rng(config.seed, _TRAIN, i, attempt), config)
            if row.prompt not in seen:
                break
        else:
            raise ValueError("every training draw is a held-out prompt: lower data.eval_size or widen the task")
        train_rows.append(row)
    return DatasetSplits(train=train_rows, eval=eval_rows)


@register_dataset("arithmetic")
def arithmetic(config: DataConfig) -> DatasetSplits:
    return synthetic_splits(arithmetic_row, config)


@register_dataset("reverse")
def reverse(config: DataConfig) -> DatasetSplits:
    return synthetic_splits(reverse_row, config)


@register_dataset("countdown")
def countdown(config: DataConfig) -> DatasetSplits:
    return synthetic_splits(countdown_row, config)
