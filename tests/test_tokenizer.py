"""The char tokenizer round-trips, saves a folder transformers loads with identical ids, and
load_tokenizer serves both dora's and Hugging Face tokenizers behind one interface."""

import json

import pytest
from hypothesis import given, strategies as st

from dora.data.tokenizer import ALPHABET, SPECIAL_TOKENS, CharTokenizer, HFTokenizer, Tokenizer, load_tokenizer

TEXTS = ["", "347+85=", "7+5=12,4+8+1=13,3+0+1=4|432", "Hello, world!\n  tabs? no. ~{}[]<>", "\n\n"]


@given(st.text(alphabet=ALPHABET, max_size=60))
def test_round_trip(text):
    tok = CharTokenizer()
    if any(s in text for s in SPECIAL_TOKENS):  # documented: "<eos>" in text is the special token
        assert tok.eos_token_id in tok.encode("a<eos>")
        return
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert tok.decode(ids) == text


def test_ids_are_stable_and_small():
    tok = CharTokenizer()
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 100
    assert tok.encode("0") == [4 + ALPHABET.index("0")]
    assert isinstance(tok, Tokenizer)


def test_decode_skips_specials_on_request():
    tok = CharTokenizer()
    ids = [tok.bos_token_id, *tok.encode("12"), tok.eos_token_id]
    assert tok.decode(ids) == "12"
    assert tok.decode(ids, skip_special_tokens=False) == "<bos>12<eos>"


def test_unknown_characters_raise_naming_them():
    with pytest.raises(ValueError, match="é"):
        CharTokenizer().encode("café")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        CharTokenizer().decode([5, 100])


def test_save_load_round_trip(tmp_path):
    CharTokenizer().save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, CharTokenizer)
    assert tok.decode(tok.encode(TEXTS[3])) == TEXTS[3]


def test_load_rejects_changed_vocabulary(tmp_path):
    CharTokenizer().save(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="different vocabulary"):
        load_tokenizer(tmp_path)


def test_transformers_auto_tokenizer_gives_identical_ids(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = CharTokenizer()
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 0)
    for text in TEXTS:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
        # the transformers/vLLM default for text prompts adds <bos>, as PromptSource does
        assert hf.encode(text) == [tok.bos_token_id, *tok.encode(text)]
        assert hf.decode(tok.encode(text), skip_special_tokens=True) == text
    assert hf.encode("é", add_special_tokens=False) == [tok.unk_token_id]


def test_hf_folder_loads_behind_the_same_interface(tmp_path):
    # Any Hugging Face tokenizer folder: here a tokenizers BPE-free WordLevel model saved by transformers.
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as RawTokenizer, models, pre_tokenizers

    raw = RawTokenizer(models.WordLevel({"[UNK]": 0, "</s>": 1, "hello": 2, "world": 3}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", unk_token="[UNK]")
    fast.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    fast.save_pretrained(str(tmp_path))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer)
    assert tok.encode("hello world") == [2, 3]
    assert tok.eos_token_id == 1 and tok.pad_token_id == 1 and tok.bos_token_id is None
    assert tok.apply_chat_template("hi") == "<user>hi<assistant>"
    with pytest.raises(ValueError, match="no chat template"):
        CharTokenizer().apply_chat_template("hi")


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(ValueError, match="holds no tokenizer"):
        load_tokenizer(tmp_path)


def test_tokenizers_only_path_without_transformers(tmp_path, monkeypatch):
    """Without transformers, a Hugging Face folder is read with `tokenizers` and its special-token files."""
    CharTokenizer().save(tmp_path)
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)  # makes `import transformers` fail
    tok = HFTokenizer(tmp_path)
    char = CharTokenizer()
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.vocab_size) == (1, 2, 0, 100)
    assert tok.encode(TEXTS[2]) == char.encode(TEXTS[2])
    assert tok.decode([1, *char.encode("42"), 2]) == "42"
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template("hi")
    tok.save(tmp_path / "copy")
    assert isinstance(load_tokenizer(tmp_path / "copy"), CharTokenizer)
