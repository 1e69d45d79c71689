"""Grade-school word problems in GSM8K's format, generated: a local stand-in for GSM8K.

GSM8K itself cannot be downloaded here, so recipes that need "GSM8K-style" data read rows made by
this module (shipped in `assets/word_problems/`, written by `tools/make_word_problems.py`). Each row
is what a GSM8K row is: a `question` and an `answer` holding the worked solution, one step per line
with calculator annotations, ending in `#### <number>`:

    {"question": "Maya buys 3 notebooks for $4 each and 2 pens for $3 each. She pays with a $20 bill.
                  How much change does she get?",
     "answer": "The notebooks cost 3 * 4 = <<3*4=12>>12 dollars.\\n... \\n#### 2"}

Four families of templates — shopping, ages, rates, sharing — each with variants of 2 to 4 steps of
+ - * /; every intermediate value and the answer are positive integers (divisions are exact).
Rows depend only on (seed, split, index): the same seed always gives the same files, and the test
split never shares a question with the training split.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

NAMES = (("Maya", "she"), ("Liam", "he"), ("Sofia", "she"), ("Noah", "he"), ("Aisha", "she"), ("Mateo", "he"),
         ("Emma", "she"), ("Kenji", "he"), ("Olivia", "she"), ("Omar", "he"), ("Priya", "she"), ("Lucas", "he"),
         ("Zoe", "she"), ("Ethan", "he"), ("Hana", "she"), ("Diego", "he"))
# (plural, lowest price, highest price) in dollars.
ITEMS = (("notebooks", 2, 6), ("pens", 1, 4), ("books", 5, 15), ("toy cars", 3, 9), ("sandwiches", 4, 8),
         ("T-shirts", 6, 20), ("plants", 3, 12), ("puzzles", 5, 14), ("tickets", 4, 10), ("mugs", 3, 9))
BILLS = (10, 20, 50, 100, 200, 500)
_STEP = re.compile(r"<<(\d+)([+\-*/])(\d+)=(-?\d+)>>")
_TRAIN, _TEST = 0, 1
_MAX_DRAWS_PER_ROW = 100


@dataclass(slots=True)
class Problem:
    question: str
    steps: list[str]
    """Solution lines, each with one `<<expression=value>>` annotation."""
    answer: int

    def to_row(self) -> dict[str, str]:
        """The GSM8K row: `question`, and `answer` = the solution lines, then `#### <answer>`."""
        return {"question": self.question, "answer": "\n".join([*self.steps, f"#### {self.answer}"])}


class _Solution:
    """Collects solution lines; `calc` evaluates one operation and writes it as GSM8K does."""

    def __init__(self) -> None:
        self.steps: list[str] = []

    def calc(self, text: str, a: int, op: str, b: int, unit: str = "") -> int:
        value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
        assert value > 0 and (op != "/" or a % b == 0), (a, op, b)
        expr = f"{a}{op}{b}"
        self.steps.append(f"{text} {a} {op} {b} = <<{expr}={value}>>{value}{unit}.")
        return value


def _person(rng: random.Random, exclude: tuple[str, ...] = ()) -> tuple[str, str]:
    return rng.choice([p for p in NAMES if p[0] not in exclude])


def shopping(rng: random.Random) -> Problem:
    name, she = _person(rng)
    (item1, lo1, hi1), (item2, lo2, hi2) = rng.sample(ITEMS, 2)
    a, p = rng.randint(2, 9), rng.randint(lo1, hi1)
    sol = _Solution()
    cost1 = sol.calc(f"The {item1} cost", a, "*", p, " dollars")
    two_items = rng.random() < 0.6
    question = f"{name} buys {a} {item1} for ${p} each"
    total = cost1
    if two_items:
        b, q = rng.randint(2, 9), rng.randint(lo2, hi2)
        cost2 = sol.calc(f"The {item2} cost", b, "*", q, " dollars")
        total = sol.calc(f"In total {she} spends", cost1, "+", cost2, " dollars")
        question += f" and {b} {item2} for ${q} each"
    if not two_items or rng.random() < 0.5:
        bill = next(x for x in BILLS if x > total)
        change = sol.calc(f"{she.capitalize()} gets back", bill, "-", total, " dollars")
        return Problem(f"{question}. {she.capitalize()} pays with a ${bill} bill. How much change does {she} get?",
                       sol.steps, change)
    return Problem(f"{question}. How much does {she} spend in total?", sol.steps, total)


def ages(rng: random.Random) -> Problem:
    n1, _ = _person(rng)
    n2, _ = _person(rng, (n1,))
    n3, _ = _person(rng, (n1, n2))
    sol = _Solution()
    variant = rng.randrange(3)
    if variant == 0:
        a, k, t = rng.randint(3, 12), rng.randint(2, 4), rng.randint(2, 15)
        now = sol.calc(f"{n2} is", a, "*", k, " years old now")
        later = sol.calc(f"In {t} years {n2} will be", now, "+", t, " years old")
        return Problem(f"{n1} is {a} years old. {n2} is {k} times as old as {n1}. How old will {n2} be in {t} years?",
                       sol.steps, later)
    if variant == 1:
        a, d = rng.randint(4, 30), rng.randint(2, 20)
        if (a + d) % 2:
            d += 1
        older = sol.calc(f"{n2} is", a, "+", d, " years old")
        half = sol.calc(f"{n3} is", older, "/", 2, " years old")
        pair = sol.calc(f"{n1} and {n2} together are", a, "+", older, " years old")
        total = sol.calc("The sum of their ages is", pair, "+", half)
        return Problem(f"{n1} is {a} years old. {n2} is {d} years older than {n1}, and {n3} is half as old as {n2}. "
                       f"What is the sum of their three ages?", sol.steps, total)
    t, now1, k = rng.randint(2, 10), rng.randint(3, 15), rng.randint(2, 5)
    future = now1 + t
    current = sol.calc(f"{n1} is now", future, "-", t, " years old")
    other = sol.calc(f"{n2} is", current, "*", k, " years old")
    return Problem(f"In {t} years, {n1} will be {future} years old. {n2} is {k} times as old as {n1} is now. "
                   f"How old is {n2}?", sol.steps, other)


def rates(rng: random.Random) -> Problem:
    sol = _Solution()
    variant = rng.randrange(4)
    if variant == 0:
        thing = rng.choice(("loaves of bread", "muffins", "pies", "bagels"))
        r, h, d = rng.randint(6, 40), rng.randint(4, 12), rng.randint(2, 7)
        daily = sol.calc("Each day the bakery makes", r, "*", h, f" {thing}")
        total = sol.calc(f"In {d} days it makes", daily, "*", d, f" {thing}")
        question = f"A bakery makes {r} {thing} every hour and is open {h} hours a day."
        if rng.random() < 0.5:
            box = rng.choice([b for b in (2, 3, 4, 5, 6, 8, 10, 12) if total % b == 0] or [1])
            if box > 1:
                boxes = sol.calc("They fill", total, "/", box, " boxes")
                return Problem(f"{question} The {thing} are packed in boxes of {box}. How many boxes does it fill "
                               f"in {d} days?", sol.steps, boxes)
        return Problem(f"{question} How many {thing} does it make in {d} days?", sol.steps, total)
    if variant == 1:
        v, t1, w, t2 = rng.randint(30, 80), rng.randint(2, 6), rng.randint(20, 70), rng.randint(1, 5)
        first = sol.calc("First the train travels", v, "*", t1, " miles")
        second = sol.calc("Then it travels", w, "*", t2, " miles")
        total = sol.calc("In total it travels", first, "+", second, " miles")
        return Problem(f"A train travels at {v} miles per hour for {t1} hours, then at {w} miles per hour for {t2} "
                       f"hours. How many miles does it travel in total?", sol.steps, total)
    if variant == 2:
        name, she = _person(rng)
        wage, h, n = rng.randint(8, 25), rng.randint(5, 20), rng.randint(2, 6)
        weekly = sol.calc(f"Each week {she} earns", wage, "*", h, " dollars")
        earned = sol.calc(f"In {n} weeks {she} earns", weekly, "*", n, " dollars")
        spend = rng.randint(1, earned - 1)
        left = sol.calc(f"{she.capitalize()} has", earned, "-", spend, " dollars left")
        thing = rng.choice(("a bike", "a video game", "a gift", "concert tickets", "a jacket"))
        return Problem(f"{name} earns ${wage} per hour and works {h} hours a week. After {n} weeks, {she} spends "
                       f"${spend} on {thing}. How much money does {she} have left?", sol.steps, left)
    r, minutes, start = rng.randint(2, 25), rng.randint(3, 30), rng.randint(5, 200)
    capacity = start + r * minutes
    missing = sol.calc("The tank still needs", capacity, "-", start, " liters")
    needed = sol.calc("Filling it takes", missing, "/", r, " minutes")
    return Problem(f"A tank holds {capacity} liters and already has {start} liters of water in it. A pump adds {r} "
                   f"liters every minute. How many minutes does it take to fill the tank?", sol.steps, needed)


def sharing(rng: random.Random) -> Problem:
    name, she = _person(rng)
    sol = _Solution()
    variant = rng.randrange(3)
    if variant == 0:
        thing = rng.choice(("stickers", "candies", "marbles", "crayons", "cards"))
        k, b, c = rng.randint(2, 8), rng.randint(2, 6), rng.randint(4, 12)
        each_target = rng.randint(b * c // k + 1, b * c // k + 15)
        a = k * each_target - b * c
        bought = sol.calc(f"{she.capitalize()} buys", b, "*", c, f" {thing}")
        total = sol.calc(f"{she.capitalize()} then has", a, "+", bought, f" {thing}")
        each = sol.calc("Each friend gets", total, "/", k, f" {thing}")
        return Problem(f"{name} has {a} {thing}. {she.capitalize()} buys {b} packs with {c} {thing} in each pack. "
                       f"Then {she} shares all of them equally among {k} friends. How many {thing} does each friend "
                       f"get?", sol.steps, each)
    if variant == 1:
        k, per, kept = rng.randint(2, 9), rng.randint(3, 12), rng.randint(1, 12)
        baked = kept + k * per
        rest = sol.calc("The boxes get", baked, "-", kept, " cookies")
        each = sol.calc("Each box has", rest, "/", k, " cookies")
        question = (f"{name} bakes {baked} cookies. {she.capitalize()} keeps {kept} for {'her' if she == 'she' else 'him'}"
                    f"self and divides the rest equally into {k} boxes.")
        if rng.random() < 0.5:
            price = rng.randint(2, 9)
            money = sol.calc("One box sells for", each, "*", price, " dollars")
            return Problem(f"{question} {she.capitalize()} sells the cookies for ${price} each. How much money does "
                           f"one box bring in?", sol.steps, money)
        return Problem(f"{question} How many cookies are in each box?", sol.steps, each)
    g, groups, m = rng.randint(2, 6), rng.randint(3, 9), rng.randint(2, 8)
    students = g * groups
    num_groups = sol.calc("There are", students, "/", g, " groups")
    markers = sol.calc("They need", num_groups, "*", m, " markers")
    return Problem(f"A class of {students} students is split into groups of {g}. Each group gets {m} markers. How "
                   f"many markers does the class need?", sol.steps, markers)


TEMPLATES: dict[str, Callable[[random.Random], Problem]] = {
    "shopping": shopping, "ages": ages, "rates": rates, "sharing": sharing,
}


def problem(seed: int, split: int, index: int, attempt: int = 0) -> Problem:
    """Row `index` of `split` (0 train, 1 test): a template family and its values drawn from a
    string-seeded RNG (the same rows in every process and Python version)."""
    rng = random.Random(f"word_problems/{seed}/{split}/{index}/{attempt}")
    return rng.choice(list(TEMPLATES.values()))(rng)


def generate(num_train: int, num_test: int, seed: int = 0) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train rows, test rows) as GSM8K dicts; no question appears twice or in both splits."""
    seen: set[str] = set()
    splits: list[list[dict[str, str]]] = []
    for split, count in ((_TEST, num_test), (_TRAIN, num_train)):  # test first: training avoids its questions
        rows = []
        for index in range(count):
            for attempt in range(_MAX_DRAWS_PER_ROW):
                p = problem(seed, split, index, attempt)
                if p.question not in seen:
                    break
            else:
                raise ValueError(f"could not draw a new question for row {index}: the templates are exhausted")
            seen.add(p.question)
            rows.append(p.to_row())
        splits.append(rows)
    test, train = splits
    return train, test


def check_solution(answer: str) -> int:
    """Re-evaluate every `<<expression=value>>` of a generated solution; the final number. An error if
    a step is wrong or the `####` line does not hold the last step's value."""
    steps = _STEP.findall(answer)
    if not steps:
        raise ValueError(f"no <<expression=value>> step in {answer!r}")
    for a, op, b, value in steps:
        x, y = int(a), int(b)
        got = {"+": x + y, "-": x - y, "*": x * y, "/": x // y if y and x % y == 0 else None}[op]
        if got != int(value):
            raise ValueError(f"step {a}{op}{b}={value} is wrong in {answer!r}")
    final = int(answer.rsplit("####", 1)[1])
    if final != int(steps[-1][3]):
        raise ValueError(f"#### {final} is not the last step's value in {answer!r}")
    return final
