"""Tokenizers: dora's built-in character-level tokenizer and Hugging Face tokenizers from a local
folder, behind one small interface (`Tokenizer`).

The PromptSource encodes prompts with it, the engines stop on its `eos_token_id`, rewards decode
responses with it. The char tokenizer is a real `tokenizers` model saved as `tokenizer.json` +
`tokenizer_config.json` + `special_tokens_map.json`, so transformers' `AutoTokenizer` (and hence
vLLM) load the same model folder and produce the same ids.

Unknown characters: `CharTokenizer.encode` raises a ValueError naming them (a character outside
the alphabet in a synthetic prompt is a bug, and mapping it silently to `<unk>` would corrupt the
reward). Consumers of the saved folder that cannot raise (transformers, vLLM) map them to `<unk>`.
The literal text of a special token ("<eos>") is encoded as that special token, as in Hugging Face.
"""

from __future__ import annotations

import json
import os
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from tokenizers import Regex, Tokenizer as _HFTokenizerModel, decoders, models, pre_tokenizers, processors

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
# Printable ASCII (digits, letters, punctuation, space) plus newline: 96 characters. Order is
# fixed forever: ids must not change between runs or versions, or saved models decode garbage.
ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))
assert len(set(ALPHABET)) == 96 and set(string.digits + "+-*=,|") <= set(ALPHABET)

CHAR_TOKENIZER_KIND = "dora-char"


@runtime_checkable
class Tokenizer(Protocol):
    """What dora needs from a tokenizer."""

    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int
    pad_token_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens."""
        ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(self, prompt: str) -> str:
        """`prompt` as a single user turn with the generation prompt appended."""
        ...

    def save(self, folder: str | os.PathLike) -> None: ...


def _build_char_model() -> _HFTokenizerModel:
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in ALPHABET:
        vocab[ch] = len(vocab)
    model = _HFTokenizerModel(models.WordLevel(vocab, unk_token=UNK))
    # Every character is its own pre-token ([\s\S] also matches newline, unlike ".").
    model.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    model.decoder = decoders.Fuse()  # concatenate, no spaces between characters
    model.add_special_tokens(list(SPECIAL_TOKENS))
    # With add_special_tokens=True (the transformers/vLLM default for text) a prompt starts with
    # <bos>, which is what PromptSource feeds the model.
    model.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return model


class CharTokenizer:
    """One token per character of `ALPHABET`, plus <pad>=0, <bos>=1, <eos>=2, <unk>=3 (vocab 100)."""

    def __init__(self) -> None:
        self._model = _build_char_model()
        self.vocab_size: int = self._model.get_vocab_size(with_added_tokens=True)
        self.pad_token_id: int = self._model.token_to_id(PAD)
        self.bos_token_id: int | None = self._model.token_to_id(BOS)
        self.eos_token_id: int = self._model.token_to_id(EOS)
        self.unk_token_id: int = self._model.token_to_id(UNK)
        self._known = frozenset(ALPHABET)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"CharTokenizer.encode expects str, got {type(text).__name__}")
        unknown = sorted(set(text) - self._known)
        if unknown:
            raise ValueError(
                f"characters {unknown!r} are not in the char tokenizer's alphabet (printable ASCII and"
                f" newline); text starts {text[:40]!r}"
            )
        return self._model.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        bad = [i for i in ids if not 0 <= int(i) < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        return self._model.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, prompt: str) -> str:
        raise ValueError("the char tokenizer has no chat template; set data.use_chat_template=false")

    def save(self, folder: str | os.PathLike) -> None:
        path = Path(folder)
        path.mkdir(parents=True, exist_ok=True)
        self._model.save(str(path / "tokenizer.json"))
        special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "model_max_length": 1_000_000,
            "clean_up_tokenization_spaces": False,
            "dora_tokenizer": CHAR_TOKENIZER_KIND,
        }
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


class HFTokenizer:
    """A Hugging Face tokenizer from a local folder.

    Uses transformers' AutoTokenizer when transformers is installed (exact HF behaviour, chat
    templates); otherwise reads `tokenizer.json` with `tokenizers` and the special tokens from
    `tokenizer_config.json` / `special_tokens_map.json` (no chat template then).
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self._hf: Any = None
        self._raw: _HFTokenizerModel | None = None
        try:
            from transformers import AutoTokenizer
        except ImportError:
            AutoTokenizer = None
        if AutoTokenizer is not None:
            self._hf = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
            self.vocab_size = len(self._hf)
            bos, eos, pad = self._hf.bos_token_id, self._hf.eos_token_id, self._hf.pad_token_id
        else:
            if not (self.folder / "tokenizer.json").is_file():
                raise ValueError(f"{self.folder} has no tokenizer.json (and transformers is not installed)")
            self._raw = _HFTokenizerModel.from_file(str(self.folder / "tokenizer.json"))
            self.vocab_size = self._raw.get_vocab_size(with_added_tokens=True)
            special = _read_special_tokens(self.folder)
            bos, eos, pad = (self._raw.token_to_id(special[k]) if special.get(k) else None
                             for k in ("bos_token", "eos_token", "pad_token"))
        if eos is None:
            raise ValueError(f"tokenizer in {self.folder} defines no eos_token (needed to stop generation)")
        self.bos_token_id: int | None = bos
        self.eos_token_id: int = eos
        # Padding never reaches the model's loss (masked), so eos is a safe stand-in when absent.
        self.pad_token_id: int = pad if pad is not None else eos

    def encode(self, text: str) -> list[int]:
        if self._hf is not None:
            return list(self._hf.encode(text, add_special_tokens=False))
        return self._raw.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)
        return self._raw.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, prompt: str) -> str:
        if self._hf is None or not getattr(self._hf, "chat_template", None):
            raise ValueError(f"tokenizer in {self.folder} has no chat template (or transformers is not installed);"
                             " set data.use_chat_template=false")
        return self._hf.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )

    def save(self, folder: str | os.PathLike) -> None:
        if self._hf is not None:
            self._hf.save_pretrained(str(folder))
            return
        path = Path(folder)
        path.mkdir(parents=True, exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (self.folder / name).is_file():
                (path / name).write_bytes((self.folder / name).read_bytes())


def _read_special_tokens(folder: Path) -> dict[str, str]:
    special: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # config wins
        file = folder / name
        if file.is_file():
            for key, value in json.loads(file.read_text()).items():
                if key.endswith("_token") and value:
                    special[key] = value["content"] if isinstance(value, dict) else value
    return special


def load_tokenizer(folder: str | os.PathLike) -> Tokenizer:
    """dora's char tokenizer if the folder holds one, else a Hugging Face tokenizer."""
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"tokenizer folder {path} does not exist")
    config_file = path / "tokenizer_config.json"
    if config_file.is_file() and json.loads(config_file.read_text()).get("dora_tokenizer") == CHAR_TOKENIZER_KIND:
        tok = CharTokenizer()
        saved = _HFTokenizerModel.from_file(str(path / "tokenizer.json")).get_vocab(with_added_tokens=True)
        if saved != tok._model.get_vocab(with_added_tokens=True):
            raise ValueError(f"{path / 'tokenizer.json'} is a dora char tokenizer with a different vocabulary"
                             " than this dora version's; ids would not match")
        return tok
    if not (path / "tokenizer.json").is_file() and not config_file.is_file():
        raise ValueError(f"{path} holds no tokenizer (expected tokenizer.json or tokenizer_config.json)")
    return HFTokenizer(path)
