"""Generated GSM8K-style word problems: correct solutions, 2-4 steps, seeded, disjoint splits, the
committed files, and the path a recipe takes (local jsonl loader -> math reward)."""

import json
import random
import re
from pathlib import Path

import pytest

from dora.data.config import DataConfig
from dora.data.datasets import build_dataset
from dora.data.word_problems import TEMPLATES, check_solution, generate, problem
from dora.rewards.math import reference_answer
from dora.rewards.registry import get_reward

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "word_problems"


@pytest.fixture(scope="module")
def rows():
    train, test = generate(600, 100, seed=3)
    return train, test


def test_solutions_are_right_and_take_two_to_four_steps(rows):
    train, test = rows
    for row in train + test:
        assert set(row) == {"question", "answer"}
        answer = check_solution(row["answer"])
        assert answer > 0 and row["answer"].endswith(f"\n#### {answer}")
        assert 2 <= row["answer"].count("<<") <= 4, row
        assert row["question"].endswith("?")


def test_every_family_varies_and_every_operation_appears():
    operations = set()
    for index in range(400):
        operations.update(re.findall(r"<<\d+([+\-*/])\d+=", "\n".join(problem(0, 0, index).steps)))
    assert operations == {"+", "-", "*", "/"}
    distinct = {name: len({template(random.Random(i)).question for i in range(50)})
                for name, template in TEMPLATES.items()}
    assert all(count > 40 for count in distinct.values()), distinct


def test_seeded_and_splits_disjoint(rows):
    train, test = rows
    assert (train, test) == generate(600, 100, seed=3)
    assert generate(50, 10, seed=4) != generate(50, 10, seed=3)
    questions = [r["question"] for r in train + test]
    assert len(set(questions)) == len(questions)


def test_check_solution_rejects_a_wrong_step():
    with pytest.raises(ValueError, match="wrong"):
        check_solution("It costs 3 * 4 = <<3*4=13>>13 dollars.\n#### 13")
    with pytest.raises(ValueError, match="last step"):
        check_solution("It costs 3 * 4 = <<3*4=12>>12 dollars.\n#### 13")


def test_committed_files_are_the_generators_output():
    meta = json.loads((ASSETS / "meta.json").read_text())
    train, test = generate(meta["train"], meta["test"], meta["seed"])
    for name, expected in (("train.jsonl", train), ("test.jsonl", test)):
        on_disk = [json.loads(line) for line in (ASSETS / name).read_text().splitlines()]
        assert on_disk == expected, f"{name} differs from: {meta['command']}"


def test_local_loader_and_math_reward_read_the_files():
    config = DataConfig(source=str(ASSETS / "train.jsonl"), eval_path=str(ASSETS / "test.jsonl"),
                        prompt_key="question", answer_key="answer")
    splits = build_dataset(config)
    assert (len(splits.train), len(splits.eval)) == (2000, 200)
    math = get_reward("math")
    for row in splits.eval[:50]:
        number = row.answer.rsplit("#### ", 1)[1]
        assert reference_answer(row.answer) == number
        assert math(row.answer, row.answer, row.meta).score == 1.0  # the worked solution itself
        assert math(f"So the answer is: {number} dollars.", row.answer, row.meta).score == 1.0
        assert math(f"So the answer is: {int(number) + 1}", row.answer, row.meta).score == 0.0
