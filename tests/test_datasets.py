"""Synthetic tasks, local jsonl/parquet datasets, the dataset registry and DataConfig validation."""

import json
import sys
import types

import numpy as np
import pytest

from dora.data.config import DataConfig
from dora.data.datasets import DATASETS, DatasetSplits, Row, build_dataset
from dora.data.tasks import arithmetic_row, arithmetic_steps, reference_solution, _rng
from dora.data.tokenizer import CharTokenizer


def test_arithmetic_reference_solution_format():
    row = Row(prompt="347+85=", answer="432", meta={"task": "arithmetic", "op": "+", "a": 347, "b": 85})
    assert reference_solution(row) == "7+5=12,4+8+1=13,3+0+1=4|432"
    assert arithmetic_steps(146, 4, "*") == ["6*4=24", "4*4+2=18", "1*4+1=5"]


def test_arithmetic_rows_are_correct_and_deterministic():
    config = DataConfig(operations=["+", "*"])
    for i in range(300):
        row = arithmetic_row(_rng(0, 0, i), config)
        assert row == arithmetic_row(_rng(0, 0, i), config)
        a, b = row.meta["a"], row.meta["b"]
        assert row.answer == str(a + b if row.meta["op"] == "+" else a * b)
        assert row.prompt == f"{a}{row.meta['op']}{b}="
        assert reference_solution(row).endswith("|" + row.answer)


def test_response_lengths_have_a_long_tail():
    config = DataConfig(train_size=4000, eval_size=0)
    splits = build_dataset(config)
    tok = CharTokenizer()
    chars = np.array([len(reference_solution(r)) for r in splits.train])
    tokens = np.array([len(tok.encode(reference_solution(r))) + 1 for r in splits.train])  # + <eos>
    assert chars.mean() <= 64
    assert np.percentile(chars, 99) / np.median(chars) >= 3
    assert np.percentile(tokens, 99) / np.median(tokens) >= 3
    assert max(len(r.prompt) for r in splits.train) <= 2 * 12 + 2


def test_synthetic_heldout_is_disjoint_and_deterministic():
    for source in ("arithmetic", "reverse", "countdown"):
        config = DataConfig(source=source, train_size=3000, eval_size=256, seed=3)
        a, b = build_dataset(config), build_dataset(config)
        assert [r.prompt for r in a.eval] == [r.prompt for r in b.eval]
        assert [r.prompt for r in a.train] == [r.prompt for r in b.train]
        held = {r.prompt for r in a.eval}
        assert len(held) == 256
        assert held.isdisjoint(r.prompt for r in a.train)
    other_seed = build_dataset(DataConfig(train_size=10, eval_size=10, seed=4))
    assert [r.prompt for r in other_seed.eval] != [r.prompt for r in build_dataset(DataConfig(train_size=10, eval_size=10)).eval]


def test_countdown_rows_are_solvable():
    for row in build_dataset(DataConfig(source="countdown", train_size=200, eval_size=0)).train:
        numbers, target = row.meta["numbers"], row.meta["target"]
        assert row.prompt == f"cd:{','.join(map(str, numbers))}>{target}=" and 0 < target <= 1000
        assert eval(reference_solution(row)) == target  # noqa: S307 (our own generated expression)


def test_reverse_task():
    row = build_dataset(DataConfig(source="reverse", train_size=5, eval_size=0)).train[0]
    text = row.prompt.removeprefix("rev:").removesuffix("=")
    assert reference_solution(row) == text[::-1] == row.answer


def _write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")


def test_local_jsonl_with_keys_and_template(tmp_path):
    records = [{"question": f"What is {i}+1?", "answer": f"... #### {i + 1}", "level": i % 3} for i in range(20)]
    _write_jsonl(tmp_path / "gsm.jsonl", records)
    config = DataConfig(source=str(tmp_path / "gsm.jsonl"), prompt_key="question", eval_size=5,
                        prompt_template="Q: {question}\nA:")
    splits = build_dataset(config)
    assert len(splits.train) == 15 and len(splits.eval) == 5
    assert {r.prompt for r in splits.train}.isdisjoint(r.prompt for r in splits.eval)
    row = splits.train[0]
    assert row.prompt.startswith("Q: What is ") and row.prompt.endswith("\nA:")
    assert row.meta["level"] in (0, 1, 2) and row.meta["source_row"] >= 0
    assert row.answer.startswith("... #### ")


def test_local_parquet_and_eval_path(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["1+1=", "2+2="], "answer": ["2", "4"]}), tmp_path / "train.parquet")
    _write_jsonl(tmp_path / "test.jsonl", [{"prompt": "3+3=", "answer": "6"}])
    splits = build_dataset(DataConfig(source=str(tmp_path / "train.parquet"), eval_path=str(tmp_path / "test.jsonl")))
    assert [r.prompt for r in splits.train] == ["1+1=", "2+2="]
    assert [(r.prompt, r.answer) for r in splits.eval] == [("3+3=", "6")]


def test_row_without_prompt_field_names_file_and_row(tmp_path):
    path = tmp_path / "bad.jsonl"
    _write_jsonl(path, [{"prompt": "a", "answer": "b"}, {"prompt": "c", "answer": "d"}, {"question": "e", "answer": "f"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl: row 2 has no prompt field 'prompt'"):
        build_dataset(DataConfig(source=str(path), eval_size=0))
    with pytest.raises(ValueError, match="does not exist"):
        build_dataset(DataConfig(source=str(tmp_path / "missing.jsonl")))
    with pytest.raises(ValueError, match="leaves no training rows"):
        build_dataset(DataConfig(source=str(path), eval_size=3, prompt_key="answer", answer_key=""))


def test_unknown_dataset_lists_registered_ones():
    with pytest.raises(ValueError, match="arithmetic, countdown, reverse"):
        build_dataset(DataConfig(source="gsm9k"))


def test_dataset_by_import_path(monkeypatch):
    module = types.ModuleType("my_datasets")
    module.rows = lambda config: [{"prompt": f"p{i}", "answer": str(i)} for i in range(10)]
    module.splits = lambda config: DatasetSplits(train=[Row("x", "1")], eval=[])
    monkeypatch.setitem(sys.modules, "my_datasets", module)
    splits = build_dataset(DataConfig(source="my_datasets:rows", eval_size=2))
    assert len(splits.train) == 8 and len(splits.eval) == 2
    assert build_dataset(DataConfig(source="my_datasets.splits")).train[0].prompt == "x"
    assert "arithmetic" in DATASETS


@pytest.mark.parametrize("kwargs, key", [
    ({"n": 0}, "data.n"), ({"train_size": 0}, "data.train_size"), ({"eval_size": -1}, "data.eval_size"),
    ({"operations": ["/"]}, "data.operations"), ({"max_digits": 30}, "data.max_digits"), ({"source": ""}, "data.source"),
    ({"prompt_key": ""}, "data.prompt_key"),
])
def test_config_validation_names_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        DataConfig(**kwargs)


def test_config_composes_with_omegaconf():
    from omegaconf import OmegaConf

    node = OmegaConf.structured(DataConfig)
    node.operations = ["+", "*"]
    assert OmegaConf.to_object(node).operations == ["+", "*"]
    node.n = 0
    with pytest.raises(ValueError, match=r"data\.n must be >= 1"):
        OmegaConf.to_object(node)


def test_relative_data_paths_resolve_from_any_directory(tmp_path, monkeypatch):
    """Recipes name data files relative to the repository; a run started elsewhere still finds them."""

    monkeypatch.chdir(tmp_path)
    splits = build_dataset(DataConfig(source="assets/word_problems/train.jsonl",
                                      eval_path="assets/word_problems/test.jsonl", prompt_key="question",
                                      answer_key="answer"))
    assert (len(splits.train), len(splits.eval)) == (2000, 200)
    with pytest.raises(ValueError, match="no_such.jsonl does not exist"):
        build_dataset(DataConfig(source="no_such.jsonl"))
