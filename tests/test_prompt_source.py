"""PromptSource: seeded epochs, exact resume (also across epochs and with requeued prompts),
requeue-first regeneration, held-out split."""

import json

import pytest
from hypothesis import given, settings, strategies as st

from dora.data.config import DataConfig
from dora.data.datasets import build_dataset
from dora.data.prompt_source import PromptSource
from dora.data.tokenizer import CharTokenizer

CONFIG = DataConfig(train_size=37, eval_size=256, n=4, seed=1)
SPLITS = build_dataset(CONFIG)


def make_source(config=CONFIG):
    return PromptSource(config, CharTokenizer(), SPLITS if config is CONFIG else None)


def key(group):
    return group.group_id, group.prompt_id, group.prompt_ids, group.num_samples


def test_groups_carry_prompt_tokens_answer_and_meta():
    source = make_source()
    group = source.next_group()
    tok = CharTokenizer()
    row = source.row(group.prompt_id)
    assert group.prompt_ids == [tok.bos_token_id, *tok.encode(row.prompt)]
    assert group.num_samples == 4 and group.answer == row.answer and group.meta["task"] == "arithmetic"
    assert group.prompt_text == row.prompt


def test_each_epoch_is_a_seeded_permutation():
    source = make_source()
    first = [g.prompt_id for g in source.take(37)]
    second = [g.prompt_id for g in source.take(37)]
    assert sorted(first) == sorted(second) == list(range(37))
    assert first != second and source.epoch == 2
    assert first == [g.prompt_id for g in make_source().take(37)]
    group_ids = [g.group_id for g in make_source().take(80)]
    assert group_ids == list(range(80))


@settings(max_examples=30)
@given(cut=st.integers(0, 120), requeues=st.lists(st.integers(0, 119), max_size=6))
def test_resume_equals_uninterrupted(cut, requeues):
    """Serve 120 groups, requeueing some prompts along the way; saving at `cut` and resuming in a
    fresh source gives exactly the same sequence."""
    def run(source, start, stop, out):
        for i in range(start, stop):
            group = source.next_group()
            out.append(key(group))
            if i in requeues:
                source.requeue(group.prompt_id)

    straight: list = []
    run(make_source(), 0, 120, straight)
    resumed: list = []
    first = make_source()
    run(first, 0, cut, resumed)
    state = json.loads(json.dumps(first.state_dict()))  # JSON-serialisable
    second = make_source()
    second.load_state_dict(state)
    run(second, cut, 120, resumed)
    assert resumed == straight


def test_requeued_prompt_comes_first_with_a_new_group_id():
    source = make_source()
    a, b = source.take(2)
    source.requeue(b.prompt_id)
    source.requeue(a.prompt_id)
    again_b, again_a, fresh = source.take(3)
    assert (again_b.prompt_id, again_a.prompt_id) == (b.prompt_id, a.prompt_id)
    assert len({a.group_id, b.group_id, again_a.group_id, again_b.group_id, fresh.group_id}) == 5
    assert fresh.prompt_id not in (a.prompt_id, b.prompt_id)
    assert source.num_requeued == 0
    with pytest.raises(ValueError, match="not a training prompt"):
        source.requeue(37)


def test_num_epochs_exhausts_but_still_serves_requeued_prompts():
    config = DataConfig(train_size=5, eval_size=3, num_epochs=2)
    source = PromptSource(config, CharTokenizer())
    groups = list(source)
    assert len(groups) == 10 and source.exhausted and source.next_group() is None
    source.requeue(groups[-1].prompt_id)
    assert not source.exhausted
    again = source.take(3)
    assert [g.prompt_id for g in again] == [groups[-1].prompt_id]
    assert again[0].group_id == groups[-1].group_id + 1
    assert source.exhausted and source.take(2) == []

    source = make_source()
    groups = source.eval_groups(num_samples=2)
    assert len(groups) == 256 and all(g.num_samples == 2 for g in groups)
    train_prompts = {SPLITS.train[i].prompt for i in range(source.num_train)}
    assert train_prompts.isdisjoint(g.prompt_text for g in groups)
    assert {g.prompt_id for g in groups} == set(range(37, 37 + 256))
    assert [g.prompt_text for g in groups] == [g.prompt_text for g in make_source().eval_groups()]
    assert [r.prompt for r in source.heldout] == [g.prompt_text for g in groups]


def test_bad_state_and_arguments_are_clear_errors():
    source = make_source()
    state = source.state_dict()
    with pytest.raises(ValueError, match="seed=1, this source has 2"):
        PromptSource(DataConfig(train_size=37, eval_size=8, seed=2), CharTokenizer()).load_state_dict(state)
    with pytest.raises(ValueError, match="lacks"):
        source.load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="num_samples"):
        source.eval_groups(0)
    with pytest.raises(ValueError, match="max_prompt_length=5"):
        PromptSource(DataConfig(train_size=20, eval_size=0, max_prompt_length=5), CharTokenizer())


class _ChatCharTokenizer(CharTokenizer):
    def apply_chat_template(self, prompt):
        return f"<user>{prompt}<assistant>"


def test_chat_template_wraps_the_templated_prompt_without_a_second_bos(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"question": "2+3?", "answer": "#### 5"}) + "\n")
    config = DataConfig(source=str(data), eval_size=0, prompt_key="question",
                        prompt_template="Q: {question}", use_chat_template=True, n=2)
    tok = _ChatCharTokenizer()
    group = PromptSource(config, tok).next_group()
    assert group.prompt_text == "<user>Q: 2+3?<assistant>"
    assert group.prompt_ids == tok.encode("<user>Q: 2+3?<assistant>")  # the template owns the start of text
    assert group.answer == "#### 5"
