"""Trainer steps on a tiny DecoderLM: split-invariant gradients, routing replay, skipping, learning."""

import copy

import pytest
import torch

from dora.trainer.backend import TorchBackend
from dora.trainer.config import AlgorithmConfig, Aggregation, OffPolicy, TrainerConfig
from dora.trainer.trainer import Trainer
from dora.trainer.value_head import ValueHead
from dora.types import FinishReason
from trainer_fixtures import random_batch, sample_batch, score, tiny_model


class RecordingBackend(TorchBackend):
    """Keeps a copy of the accumulated gradients of every update before stepping."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.grads: list[dict[str, torch.Tensor]] = []

    def step(self):
        named = list(self.policy.named_parameters())
        if self.value_head is not None:
            named += [(f"value_head.{n}", p) for n, p in self.value_head.named_parameters()]
        self.grads.append({n: p.grad.clone() for n, p in named if p.grad is not None})
        return super().step()


def _grads(model, batch, algo, max_tokens):
    cfg = TrainerConfig(lr=1e-3, max_tokens_per_microbatch=max_tokens, logprob_chunk_size=5)
    value_head = ValueHead(model.config.hidden_size, seed=0) if algo.loss == "ppo" else None
    backend = RecordingBackend(copy.deepcopy(model), cfg, value_head=value_head)
    metrics = Trainer(backend.policy, algo, cfg, backend=backend).train_step(copy.deepcopy(batch))
    return backend.grads[0], metrics


@pytest.mark.parametrize("algo", [
    AlgorithmConfig(),
    AlgorithmConfig(aggregation=Aggregation.seq_mean_token_mean, std_normalize=False, clip_high=0.28),
    AlgorithmConfig(aggregation=Aggregation.seq_mean_token_sum_norm, seq_norm_constant=8.0, entropy_coef=0.01,
                    off_policy=OffPolicy.tis, is_cap=1.5),
    AlgorithmConfig(loss="ppo", advantage="gae", lam=0.9),
], ids=["token_mean", "seq_mean_token_mean", "sum_norm_tis_entropy", "ppo"])
def test_gradient_does_not_depend_on_microbatch_split(algo):
    torch.manual_seed(0)
    model = tiny_model(seed=1)
    batch = random_batch(model, seed=2)
    whole, m_whole = _grads(model, batch, algo, max_tokens=10_000)
    split, m_split = _grads(model, batch, algo, max_tokens=12)
    assert m_whole.num_microbatches == 1 and m_split.num_microbatches >= 4
    assert whole.keys() == split.keys() and len(whole) > 10
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=0, atol=1e-6, msg=name)
    assert abs(m_whole.loss - m_split.loss) < 1e-6
    assert max(g.abs().max().item() for g in whole.values()) > 1e-3  # a real gradient was compared


def _own_batch(model, seed=3):
    """Trajectories whose behavior log-probs and routing are exactly the model's own (ratio 1, no mismatch)."""
    batch = random_batch(model, seed=seed)
    for t in batch.trajectories:
        t.behavior_logprobs, t.routing = score(model, t.prompt_ids, t.response_ids)
    return batch


def _frozen_step(model, batch, **algo):
    """One train step with lr 0 (parameters unchanged): the metrics of the loss at these weights."""
    return Trainer(model, AlgorithmConfig(**algo), TrainerConfig(lr=0.0)).train_step(batch)


def _shift_last_layer_last_token(batch, num_experts):
    """A copy whose routing differs in the last MoE layer at each trajectory's last fed token (the
    position that predicts the last response token)."""
    shifted = copy.deepcopy(batch)
    for t in shifted.trajectories:
        t.routing[-1, -1] = (t.routing[-1, -1].long() + 1) % num_experts  # another set of 2 experts out of 4
    return shifted


def test_routing_replay_uses_the_recorded_experts():
    model = tiny_model(seed=4)
    batch = _own_batch(model)
    base = _frozen_step(model, copy.deepcopy(batch))
    assert base.routing_mismatch == 0.0 and base.routing_mismatch_layer == 0.0
    assert base.extra["ratio_mean"] == pytest.approx(1.0, abs=1e-5)

    shifted = _shift_last_layer_last_token(batch, model.config.num_experts)
    replayed = _frozen_step(model, copy.deepcopy(shifted))
    assert abs(replayed.loss - base.loss) > 1e-4  # other experts -> other log-probs -> other loss
    assert abs(replayed.extra["ratio_mean"] - 1.0) > 1e-4
    # Only the last layer's choice at one token per trajectory was changed, and replaying it in the
    # last layer cannot move any router's input: the mismatch is exactly those tokens.
    fed = sum(len(t.prompt_ids) + t.num_tokens - 1 for t in batch.trajectories)
    num_traj = len(batch.trajectories)
    assert replayed.routing_mismatch == pytest.approx(num_traj / fed)
    assert replayed.routing_mismatch_layer == pytest.approx(num_traj / (fed * model.config.num_moe_layers))

    # Replay off: the record is ignored by the forward (same loss as the matching record), still measured.
    off = _frozen_step(model, copy.deepcopy(shifted), routing_replay=False)
    assert off.loss == pytest.approx(base.loss, abs=1e-6)
    assert off.routing_mismatch == pytest.approx(num_traj / fed)


def test_replay_without_a_record_is_a_clear_error():
    model = tiny_model(seed=4)
    batch = _own_batch(model)
    batch.trajectories[1].routing = None
    with pytest.raises(ValueError, match="routing_replay=false"):
        _frozen_step(model, batch)
    with pytest.raises(ValueError, match="no MoE layers"):
        Trainer(tiny_model(num_experts=0), AlgorithmConfig(routing_replay=True), TrainerConfig())


def test_non_finite_loss_skips_the_update_and_leaves_parameters():
    model = tiny_model(seed=5)
    trainer = Trainer(model, AlgorithmConfig(), TrainerConfig(lr=1e-2, max_tokens_per_microbatch=16))
    before = trainer.publish_weights()
    bad = random_batch(model, seed=6)
    bad.trajectories[-1].behavior_logprobs[0] = float("nan")
    metrics = trainer.train_step(bad)
    assert metrics.skipped and metrics.num_skipped_updates == 1 and metrics.total_skipped_updates == 1
    after = trainer.publish_weights()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert trainer.backend.optimizer.state == {} and trainer.backend.num_updates == 0
    good = trainer.train_step(random_batch(model, seed=7))
    assert not good.skipped and good.total_skipped_updates == 1
    assert any(not torch.equal(before[k], v) for k, v in trainer.publish_weights().items())


def test_publish_weights_are_detached_cpu_copies_in_model_naming():
    model = tiny_model(seed=8)
    trainer = Trainer(model, AlgorithmConfig(), TrainerConfig(lr=1e-2))
    published = trainer.publish_weights()
    assert published.keys() == model.state_dict().keys()
    assert "model.layers.0.mlp.experts.gate_up_proj" in published
    assert all(t.device.type == "cpu" and t.is_contiguous() and not t.requires_grad for t in published.values())
    snapshot = {k: v.clone() for k, v in published.items()}
    trainer.train_step(random_batch(model, seed=9))
    assert all(torch.equal(snapshot[k], published[k]) for k in published)  # not aliasing the live weights


def test_bad_trajectories_are_rejected_with_their_ids():
    model = tiny_model(seed=0)
    trainer = Trainer(model, AlgorithmConfig(routing_replay=False), TrainerConfig())
    batch = random_batch(model, seed=1)
    batch.groups[1][2].finish_reason = FinishReason.ABORT
    with pytest.raises(ValueError, match="group 1 sample 2 was aborted"):
        trainer.train_step(batch)
    batch = random_batch(model, seed=1)
    batch.groups[0][1].behavior_logprobs = torch.zeros(99)
    with pytest.raises(ValueError, match=r"group 0 sample 1: behavior_logprobs has shape \[99\]"):
        trainer.train_step(batch)
    batch = random_batch(model, seed=1)
    batch.groups[2][0].response_ids[0] = 16
    with pytest.raises(ValueError, match=r"group 2 sample 0 has token ids outside the vocabulary \[0, 16\)"):
        trainer.train_step(batch)


def test_several_updates_per_step_with_decoupled_ppo_and_kl():
    model = tiny_model(seed=10)
    algo = AlgorithmConfig(off_policy=OffPolicy.decoupled, ppo_epochs=2, num_minibatches=2, kl_coef=0.05,
                           kl_estimator="k1")
    trainer = Trainer(model, algo, TrainerConfig(lr=3e-3))
    metrics = trainer.train_step(random_batch(model, seed=11))
    assert metrics.num_updates == 4 and not metrics.skipped
    # proximal = weights at the start of the step, behavior = perturbed log-probs: IS weights != 1
    assert metrics.extra["is_weight_max"] > 1.0 > metrics.extra["is_weight_min"]
    assert metrics.approx_kl > 0  # later updates moved away from the proximal policy
    assert metrics.kl != 0  # the policy left the reference during the step
    ref = trainer.ref_model.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in tiny_model(seed=10).state_dict().items())  # reference frozen


def _target_rate(response):
    return sum(tok == 5 for tok in response) / len(response)


@pytest.mark.parametrize("algo", [
    AlgorithmConfig(clip_high=0.28),
    AlgorithmConfig(loss="ppo", advantage="gae", gamma=1.0, lam=0.95),
], ids=["grpo", "ppo"])
def test_trainer_learns_to_emit_the_rewarded_token(algo):
    torch.manual_seed(0)
    model = tiny_model(seed=12)
    trainer = Trainer(model, algo, TrainerConfig(lr=1e-2, value_lr=3e-2, max_tokens_per_microbatch=64))
    g = torch.Generator().manual_seed(13)

    def target_logprob():
        with torch.no_grad():
            out = model(torch.tensor([[1, 2, 3]]))
            return torch.log_softmax(out.logits_BSV[0, -1].float(), -1)[5].item()

    start_logprob = target_logprob()
    rewards = []
    for step in range(12):
        batch = sample_batch(model, step=step, num_groups=4, group_size=4, prompt_len=3, response_len=4,
                             reward_fn=_target_rate, generator=g)
        metrics = trainer.train_step(batch)
        assert not metrics.skipped
        rewards.append(metrics.reward_mean)
    # start: ~1/16 of tokens are the target; learning makes it far more frequent
    assert sum(rewards[:3]) / 3 < 0.2
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.2, rewards
    assert target_logprob() > start_logprob + 0.5
    if algo.loss == "ppo":
        # The critic (zero-initialised: V = 0) now predicts the outcome on fresh samples better than
        # it did at the start. With gamma = 1 and a reward on the last token only, the Monte-Carlo
        # return of every response position is the sequence's reward.
        batch = sample_batch(model, step=99, num_groups=4, group_size=4, prompt_len=3, response_len=4,
                             reward_fn=_target_rate, generator=g)
        errors_now, errors_zero = [], []
        with torch.no_grad():
            for t in batch.trajectories:
                hidden = model(torch.tensor([t.prompt_ids + t.response_ids[:-1]]), return_hidden=True).hidden_BSD[0]
                values = trainer.backend.value_head(hidden[len(t.prompt_ids) - 1:])
                errors_now.append(((values - t.reward) ** 2).mean().item())
                errors_zero.append(t.reward ** 2)
        assert sum(errors_now) < 0.5 * sum(errors_zero)


def test_resumed_trainer_takes_the_same_next_step():
    algo = AlgorithmConfig(kl_coef=0.1, num_minibatches=2, ppo_epochs=2)
    cfg = TrainerConfig(lr=1e-2, lr_schedule="cosine", total_steps=20)
    a = Trainer(tiny_model(seed=14), algo, cfg)
    a.train_step(random_batch(a.backend.policy, seed=15))
    b = Trainer(tiny_model(seed=99), algo, cfg)  # other weights: everything must come from the state
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    batch = random_batch(a.backend.policy, seed=16)
    ma, mb = a.train_step(copy.deepcopy(batch)), b.train_step(copy.deepcopy(batch))
    assert ma.loss == mb.loss and ma.kl == mb.kl and ma.lr == mb.lr
    wa, wb = a.publish_weights(), b.publish_weights()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_loss_shares_average_over_updates():
    model = tiny_model(seed=17)
    algo = AlgorithmConfig(loss="ppo", advantage="gae", ppo_epochs=3)
    metrics = Trainer(model, algo, TrainerConfig(lr=0.0)).train_step(random_batch(model, seed=18))
    # lr 0: three identical updates; per-update totals must average, not add up
    assert metrics.num_updates == 3
    one = Trainer(tiny_model(seed=17), AlgorithmConfig(loss="ppo", advantage="gae"), TrainerConfig(lr=0.0)).train_step(
        random_batch(model, seed=18))
    assert metrics.extra["value_loss"] == pytest.approx(one.extra["value_loss"], rel=1e-5)
    assert metrics.loss == pytest.approx(one.loss, rel=1e-5)


def test_dense_model_trains_without_routing():
    model = tiny_model(seed=19, num_experts=0)
    batch = random_batch(model, seed=20)
    assert all(t.routing is None for t in batch.trajectories)
    trainer = Trainer(model, AlgorithmConfig(), TrainerConfig(lr=1e-2))
    before = trainer.publish_weights()
    metrics = trainer.train_step(batch)
    assert not trainer.replay and not metrics.skipped and metrics.grad_norm > 0
    assert metrics.routing_mismatch != metrics.routing_mismatch  # nan: nothing to compare
    assert any(not torch.equal(before[k], v) for k, v in trainer.publish_weights().items())
