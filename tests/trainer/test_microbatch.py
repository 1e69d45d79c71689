"""Token-budget micro-batch planning and the layout of a micro-batch."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from dora.trainer.microbatch import build_microbatch, build_microbatches, plan_microbatches
from dora.types import FinishReason, Trajectory


@given(st.lists(st.integers(1, 50), min_size=1, max_size=40), st.integers(1, 200))
def test_plan_covers_each_index_once_within_budget(lengths, budget):
    plans = plan_microbatches(lengths, budget)
    assert sorted(i for plan in plans for i in plan) == list(range(len(lengths)))
    for plan in plans:
        padded = len(plan) * max(lengths[i] for i in plan)
        assert padded <= budget or len(plan) == 1  # an over-long sequence goes alone, never dropped


@given(st.lists(st.integers(1, 40), min_size=1, max_size=9), st.integers(1, 120), st.integers(0, 50))
def test_plan_is_the_cheapest_cut_of_the_sorted_order(lengths, budget, overhead):
    """Padded tokens + overhead per micro-batch equal the optimum over every way of cutting the
    longest-first order into budget-respecting runs (enumerated here)."""
    plans = plan_microbatches(lengths, budget, overhead_tokens=overhead)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    assert [i for plan in plans for i in plan] == order

    def cost(runs):
        return sum(len(run) * max(lengths[i] for i in run) + overhead for run in runs)

    def best(start):  # cheapest cut of order[start:]
        if start == len(order):
            return 0
        options = [len(order[start:end]) * lengths[order[start]] + overhead + best(end)
                   for end in range(start + 1, len(order) + 1)
                   if end - start == 1 or (end - start) * lengths[order[start]] <= budget]
        return min(options)

    assert cost(plans) == best(0)


def test_plan_cuts_where_padding_is_wasted():
    # Greedy filling would put 4 rows of 10 with 3 rows of 2 (70 padded tokens); two micro-batches cost 46 + 2 x 8.
    assert plan_microbatches([10, 10, 10, 10, 2, 2, 2], 100, overhead_tokens=8) == [[0, 1, 2, 3], [4, 5, 6]]
    assert plan_microbatches([10, 10, 10, 10, 2, 2, 2], 100, overhead_tokens=40) == [[0, 1, 2, 3, 4, 5, 6]]


def _traj(prompt, response, routing=True):
    fed = len(prompt) + len(response) - 1
    return Trajectory(group_id=0, sample_idx=0, prompt_id=0, prompt_ids=prompt, response_ids=response,
                      behavior_logprobs=torch.zeros(len(response)), version=0, min_version=0, max_version=0,
                      finish_reason=FinishReason.LENGTH, reward=0.0,
                      routing=torch.arange(fed * 2 * 3).view(fed, 2, 3).to(torch.uint8) if routing else None)


def test_microbatch_layout():
    trajs = [_traj([1, 2], [3, 4, 5]), _traj([6], [7, 8])]
    fields = {"adv": [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0])]}
    mb = build_microbatch(trajs, [0, 1], fields)
    # fed = prompt + response[:-1]; right padded with 0
    assert mb.input_ids_BS.tolist() == [[1, 2, 3, 4], [6, 7, 0, 0]]
    assert mb.attention_mask_BS.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    # response token j of row r is predicted at position P - 1 + j
    assert mb.rows_N.tolist() == [0, 0, 0, 1, 1]
    assert mb.cols_N.tolist() == [1, 2, 3, 0, 1]
    assert mb.targets_N.tolist() == [3, 4, 5, 7, 8]
    assert mb.fields["adv"].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert mb.lengths == [3, 2]
    assert mb.replay_BSLK.shape == (2, 4, 2, 3)
    torch.testing.assert_close(mb.replay_BSLK[1, :2], trajs[1].routing)
    assert mb.replay_BSLK[1, 2:].abs().sum() == 0


def test_budget_splits_longest_first_and_routing_optional():
    trajs = [_traj([1], [2, 3]), _traj([1, 2, 3], [4, 5, 6], routing=False), _traj([1], [2])]
    mbs = build_microbatches(trajs, {}, max_tokens=5)
    assert [mb.traj_indices for mb in mbs] == [[1], [0, 2]]
    assert mbs[0].replay_BSLK is None and mbs[1].replay_BSLK is not None
    try:
        build_microbatches(trajs, {}, max_tokens=5, require_routing=True)
    except ValueError as e:
        assert "routing_replay=false" in str(e)
    else:
        raise AssertionError("a missing routing record must fail when replay is on")
