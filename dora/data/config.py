"""`DataConfig`: which dataset feeds the PromptSource and how its rows become prompts.

Hydra-friendly (plain types, no Literal); validated in `__post_init__` so a wrong value fails at
start naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ARITHMETIC_OPERATIONS = ("+", "*")  # "*" multiplies by one digit (2..9)


@dataclass(slots=True)
class DataConfig:
    source: str = "arithmetic"
    """A registered dataset name ("arithmetic", "reverse"), a local .jsonl/.parquet file, or an
    import path 'package.module:factory' to a `factory(config) -> DatasetSplits`."""
    n: int = 8
    """Samples per prompt (the GRPO group size)."""
    num_epochs: int = 0
    """Passes over the training split before the PromptSource reports exhaustion (next_group() ->
    None); requeued prompts are still served after that. 0 = cycle forever."""
    seed: int = 0
    """Seeds the synthetic generators, the held-out split of local files and the epoch shuffles."""
    train_size: int = 20_000
    """Rows in the training split of a synthetic task (local files use every row not held out)."""
    eval_size: int = 256
    """Held-out prompts for evaluation, disjoint from training. For a local file without
    `eval_path` they are a seeded random subset of its rows."""
    eval_path: str = ""
    """Optional local file holding the held-out split (then no training row is held out)."""
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    prompt_template: str = ""
    """Optional str.format template applied to a local row's fields, e.g. "Q: {question}\\nA:";
    empty = the `prompt_key` field as is."""
    use_chat_template: bool = False
    """Wrap each prompt in the tokenizer's chat template (Hugging Face tokenizers that have one)."""
    max_prompt_length: int = 1024
    """Prompts longer than this (in tokens, with <bos>) are an error at start; 0 = no limit."""
    max_digits: int = 12
    """Arithmetic: the longest operand (digit counts follow a fixed long-tailed distribution)."""
    operations: list[str] = field(default_factory=lambda: ["+"])
    """Arithmetic: operations to draw from, among ("+", "*"); "*" multiplies by one digit."""
    max_string_length: int = 40
    """Reverse: the longest string to reverse."""

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("data.source must name a dataset, a .jsonl/.parquet file or an import path")
        for key in ("n", "train_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"data.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("eval_size", "max_prompt_length", "num_epochs"):
            if getattr(self, key) < 0:
                raise ValueError(f"data.{key} must be >= 0, got {getattr(self, key)}")
        if not self.prompt_key:
            raise ValueError("data.prompt_key must name the field that holds the prompt")
        if not 1 <= self.max_digits <= 18:
            raise ValueError(f"data.max_digits must be in 1..18, got {self.max_digits}")
        if not 1 <= self.max_string_length <= 200:
            raise ValueError(f"data.max_string_length must be in 1..200, got {self.max_string_length}")
        self.operations = list(self.operations)
        bad = [op for op in self.operations if op not in ARITHMETIC_OPERATIONS]
        if bad or not self.operations:
            raise ValueError(f"data.operations must be a non-empty subset of {list(ARITHMETIC_OPERATIONS)},"
                             f" got {self.operations}")
