"""Datasets: where prompt rows come from, before the PromptSource turns them into groups.

A dataset is a `DatasetSplits` (a training split and a fixed held-out split of `Row`s). `data.source`
names one of:
- a registered dataset (`@register_dataset("arithmetic")`; the built-in synthetic tasks live in
  `dora.data.tasks`),
- a local `.jsonl` / `.parquet` file (GSM8K style: `prompt_key` / `answer_key` say which fields
  hold prompt and answer, `prompt_template` may combine fields),
- an import path `package.module:factory` to the user's own `factory(config)` returning
  `DatasetSplits` or an iterable of `Row`s / dicts (then split like a local file).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dora.data.config import DataConfig
from dora.paths import REPO_ROOT, resolve_path
from dora.registry import Registry

LOCAL_SUFFIXES = (".jsonl", ".parquet")


@dataclass(slots=True)
class Row:
    prompt: str
    """Prompt text (before the chat template, if any)."""
    answer: Any = None
    """What the reward compares against."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Passed to the reward with the answer (task name, operands, source file and row, ...)."""


@dataclass(slots=True)
class DatasetSplits:
    train: Sequence[Row]
    eval: Sequence[Row]
    """Held out for evaluation: never served for training."""

    def __post_init__(self) -> None:
        if len(self.train) == 0:
            raise ValueError("the dataset's training split is empty")


DatasetFactory = Callable[[DataConfig], "DatasetSplits | Iterable[Row | Mapping[str, Any]]"]
DATASETS: Registry[DatasetFactory] = Registry("dataset")


def register_dataset(name: str) -> Callable[[DatasetFactory], DatasetFactory]:
    return DATASETS.register(name)


def build_dataset(config: DataConfig) -> DatasetSplits:
    """The splits `config.source` names (see the module docstring for what it may name)."""
    import dora.data.tasks  # noqa: F401  (registers the built-in synthetic tasks)

    source = config.source
    if source in DATASETS:
        return _as_splits(DATASETS.get(source)(config), config, source)
    if Path(source).suffix in LOCAL_SUFFIXES or resolve_path(source).is_file():
        train = read_local_rows(source, config)
        if config.eval_path:
            return DatasetSplits(train=train, eval=read_local_rows(config.eval_path, config))
        return split_rows(train, config, source)
    factory = DATASETS.get(source)  # an import path, or an error listing the registered names
    if not callable(factory):
        raise ValueError(f"data.source {source!r} is not callable (expected factory(config) -> DatasetSplits)")
    return _as_splits(factory(config), config, source)


def _as_splits(result: Any, config: DataConfig, source: str) -> DatasetSplits:
    if isinstance(result, DatasetSplits):
        return result
    if isinstance(result, (str, bytes, Mapping)) or not isinstance(result, Iterable):
        raise ValueError(f"dataset {source!r} returned {type(result).__name__}; expected DatasetSplits or an"
                         " iterable of Row / dict rows")
    rows = [r if isinstance(r, Row) else row_from_record(r, config, source, i) for i, r in enumerate(result)]
    return split_rows(rows, config, source)


def split_rows(rows: Sequence[Row], config: DataConfig, source: str) -> DatasetSplits:
    """Hold out a seeded random `eval_size` rows; the others, in file order, are for training."""
    if config.eval_size >= len(rows):
        raise ValueError(f"data.eval_size={config.eval_size} leaves no training rows in {source} ({len(rows)} rows);"
                         " lower it or give data.eval_path")
    held = set(np.random.default_rng(config.seed).permutation(len(rows))[: config.eval_size].tolist())
    return DatasetSplits(
        train=[r for i, r in enumerate(rows) if i not in held],
        eval=[r for i, r in enumerate(rows) if i in held],
    )


def read_local_rows(path: str, config: DataConfig) -> list[Row]:
    file = resolve_path(path)
    if not file.is_file():
        raise ValueError(f"dataset file {path} does not exist (neither in the working directory nor in {REPO_ROOT})")
    if file.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}: row {len(records)} (line {lineno}) is not valid JSON: {e}") from None
            records.append(record)
    elif file.suffix == ".parquet":
        import pyarrow.parquet as pq

        records = pq.read_table(file).to_pylist()
    else:
        raise ValueError(f"dataset file {file} must end in one of {list(LOCAL_SUFFIXES)}")
    if not records:
        raise ValueError(f"dataset file {file} holds no rows")
    return [row_from_record(record, config, str(file), i) for i, record in enumerate(records)]


def row_from_record(record: Any, config: DataConfig, source: str, index: int) -> Row:
    """One dataset row; `index` is its 0-based position in `source` (named in every error)."""
    where = f"{source}: row {index}"
    if not isinstance(record, Mapping):
        raise ValueError(f"{where} is a {type(record).__name__}, expected an object with a {config.prompt_key!r} field")
    if config.prompt_key not in record:
        raise ValueError(f"{where} has no prompt field {config.prompt_key!r} (fields: {sorted(record)});"
                         " set data.prompt_key")
    if config.answer_key and config.answer_key not in record:
        raise ValueError(f"{where} has no answer field {config.answer_key!r} (fields: {sorted(record)});"
                         " set data.answer_key (empty for none)")
    if config.prompt_template:
        try:
            prompt = config.prompt_template.format(**record)
        except KeyError as e:
            raise ValueError(f"{where}: data.prompt_template uses field {e} that the row lacks") from None
    else:
        prompt = record[config.prompt_key]
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"{where}: prompt field {config.prompt_key!r} must be a non-empty string, got {prompt!r}")
    used = {config.prompt_key, config.answer_key}
    meta = {k: v for k, v in record.items() if k not in used}
    meta.update(source=source, source_row=index)
    return Row(prompt=prompt, answer=record.get(config.answer_key) if config.answer_key else None, meta=meta)
