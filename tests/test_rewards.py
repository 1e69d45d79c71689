"""Reward functions: registry, math answer extraction and normalisation, synthetic verifiers."""

import pytest

from dora.data.config import DataConfig
from dora.data.datasets import build_dataset
from dora.data.tasks import reference_solution
from dora.rewards.math import extract_answer, parse_number, reference_answer
from dora.rewards.registry import REWARDS, RewardResult, get_reward, is_inline, to_result


@pytest.mark.parametrize("response, expected", [
    (r"so the result is \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
    (r"\boxed{x^{2}+1} and then \boxed{42}", "42"),
    (r"nested \boxed{\sqrt{\frac{a}{b}}}", r"\sqrt{\frac{a}{b}}"),
    ("Natalia sold 48 clips.\n#### 72", "72"),
    ("The final answer is $1,000.", "$1,000"),
    ("Answer: -3", "-3"),
    ("first 3 then 4.5", "4.5"),
    ("no digits here", None),
    (r"unbalanced \boxed{12", None),
    ("So, the answer is: 2", "2"),
    ("**Answer:** 29", "29"),
    ("**Answer: 29**", "29"),
    ("The answer is 72 apples.", "72"),
    ("#### 1,000 dollars", "1,000"),
    ("The answer is 3/4 cup", "3/4"),
    ("the answer is 2x+1", "2x+1"),
])
def test_extract_answer(response, expected):
    assert extract_answer(response)[0] == expected


@pytest.mark.parametrize("text, value", [
    ("1,000", 1000), ("1000.0", 1000), ("$18", 18), ("50%", 50), (r"\frac{3}{4}", 0.75), ("3/4", 0.75),
    ("-0.25", -0.25), (r"\text{12 }", 12), ("7.", 7), (".5", 0.5),
])
def test_parse_number(text, value):
    assert parse_number(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["1,2", "x+1", "1/0", "", "12 apples"])
def test_parse_number_rejects_non_numbers(text):
    assert parse_number(text) is None


@pytest.mark.parametrize("response, answer, score", [
    (r"\boxed{0.5}", "1/2", 1.0),
    ("so #### 1,000", "She earned ... #### 1000", 1.0),
    ("The answer is 72", "72.0", 1.0),
    (r"\boxed{71}", "72", 0.0),
    ("I think 72", "72", 1.0),
    (r"\boxed{x^{2} + 1}", r"\boxed{x^{2}+1}", 1.0),
    ("He has 12 left.\nThe answer is: 12 stickers.", "Each friend gets 12 stickers.\n#### 12", 1.0),
])
def test_math_reward(response, answer, score):
    assert get_reward("math")(response, answer, {}).score == score


def test_math_format_credit_and_strictness():
    math = get_reward("math")
    assert math(r"\boxed{71}", "72", {}, format_credit=0.2).score == 0.2
    assert math("maybe 71", "72", {}, format_credit=0.2).score == 0.0
    assert math("I think 72", "72", {}, fallback_last_number=False).score == 0.0
    assert reference_answer("work #### 18") == "18"


def test_exact_match():
    em = get_reward("exact_match")
    assert em(" cba\n", "cba", {}).score == 1.0
    assert em("CBA", "cba", {}).score == 0.0 and em("CBA", "cba", {}, case_sensitive=False).score == 1.0


@pytest.fixture(scope="module")
def synthetic_rows():
    rows = list(build_dataset(DataConfig(train_size=200, eval_size=0, operations=["+", "*"])).train)
    rows += build_dataset(DataConfig(source="countdown", train_size=100, eval_size=0)).train
    return rows + list(build_dataset(DataConfig(source="reverse", train_size=100, eval_size=0)).train)


def _corrupt(text: str) -> str:
    """Change the last digit of the final answer (or the last letter) to another one."""
    last = text[-1]
    return text[:-1] + ("0123456789"[(int(last) + 1) % 10] if last.isdigit() else ("a" if last != "a" else "b"))


def test_synthetic_verifier_on_reference_and_corrupted_solutions(synthetic_rows):
    reward = get_reward("synthetic")
    for row in synthetic_rows:
        good = reference_solution(row)
        assert reward(good, row.answer, row.meta).score == 1.0
        assert reward(good + "\n", row.answer, row.meta).score == 1.0
        bad = _corrupt(good)
        partial = reward(bad, row.answer, row.meta, partial_credit=0.3).score
        assert 0.0 <= partial <= 0.3
        assert reward(bad, row.answer, row.meta).score == 0.0


def test_arithmetic_partial_credit_rewards_format_and_correct_steps():
    meta = {"task": "arithmetic", "op": "+", "a": 347, "b": 85}
    arithmetic = get_reward("arithmetic")
    right_steps_wrong_result = arithmetic("7+5=12,4+8+1=13,3+0+1=4|433", "432", meta, partial_credit=0.2)
    wrong_steps = arithmetic("7+5=11,4+8=12,3+0=3|312", "432", meta, partial_credit=0.2)
    malformed = arithmetic("432", "432 ", meta, partial_credit=0.2)
    assert right_steps_wrong_result.score == pytest.approx(0.2)
    assert 0.1 <= wrong_steps.score < right_steps_wrong_result.score
    assert malformed.score == 0.0 and malformed.info["well_formed"] is False
    with pytest.raises(ValueError, match="partial_credit"):
        arithmetic("1+1=2|2", "2", meta, partial_credit=1.5)


@pytest.mark.parametrize("response, score", [
    ("(6-3)*7", 1.0), ("7*(6-3)", 1.0), (" 7*3 ", 1.0), ("7*7-3*6+(-0)", 0.0), ("6*7", 0.1 * (1 + 0) / 2),
    ("3*7+6-6", 0.0), ("__import__('os')", 0.0), ("7*3*1", 0.0), ("6+7+3", 0.1 * (1 + 16 / 21) / 2), ("6+", 0.0),
])
def test_countdown_verifier(response, score):
    meta = {"task": "countdown", "numbers": [3, 6, 7], "target": 21}
    assert get_reward("countdown")(response, "21", meta, partial_credit=0.1).score == pytest.approx(score)


def test_unknown_reward_lists_registered_ones():
    with pytest.raises(ValueError, match="unknown reward 'nope'; registered: arithmetic, countdown, exact_match, math, reverse, synthetic"):
        get_reward("nope")
    with pytest.raises(ValueError, match="synthetic reward"):
        get_reward("synthetic")("1", "1", {"task": "chess"})
    assert is_inline(get_reward("math")) and "exact_match" in REWARDS


def test_to_result_validates_values():
    assert to_result(True) == RewardResult(1.0, {})
    assert to_result(RewardResult(0.5, {"a": 1})).info == {"a": 1}
    with pytest.raises(TypeError):
        to_result("1.0")
    with pytest.raises(ValueError):
        to_result(float("nan"))
