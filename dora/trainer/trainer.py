"""The train step: one `Batch` of complete groups in, one optimizer-updated policy out.

Last stage of the flow (TrajectoryBuffer -> `Trainer` -> WeightSync). `Trainer.train_step(batch)`:
1. checks the trajectories (rewards present, not aborted, shapes consistent);
2. when needed, one no-grad pass with the weights at the start of the step: proximal log-probs
   (decoupled PPO / TIS / MIS with several updates per step), the critic's values (GAE), reference
   log-probs (KL penalty);
3. advantages from the registered estimator (stored on `batch.advantages`);
4. `ppo_epochs x num_minibatches` optimizer updates; each cuts its trajectories into token-budget
   micro-batches, runs forward with routing replay (MoE: the engine's recorded experts), the
   chunked log-probs, the registered loss (normalised over the whole update), backward, and one
   backend step. A non-finite loss or gradient skips that update, logged and counted;
5. returns `TrainMetrics`. `publish_weights()` then gives the new version's tensors.

A step publishes exactly one version whatever the number of updates inside it: off-policyness
between updates is the loss's business (ratio, clipping) and shows in the metrics.

Shape legend: N = scored tokens of a micro-batch, T = response tokens of one trajectory,
B/S = micro-batch rows/positions, L = MoE layers, K = experts per token.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from dora.telemetry.metrics import MetricBag, Reduce
from dora.trainer.advantages import ADVANTAGES
from dora.trainer.backend import TorchBackend, TrainerBackend
from dora.trainer.config import AlgorithmConfig, OffPolicy, TrainerConfig
from dora.trainer.logprobs import chunked_logprobs
from dora.trainer.losses import LOSSES, LossInputs
from dora.trainer.losses.aggregation import aggregation_weights
from dora.trainer.microbatch import MicroBatch, build_microbatches
from dora.trainer.routing import RouterTopkProbe, routing_mismatch
from dora.trainer.value_head import ValueHead
from dora.types import Batch, FinishReason, Trajectory

log = logging.getLogger(__name__)


@dataclass(slots=True)
class TrainMetrics:
    """What one train step reports (nan = not measured in this configuration)."""

    step: int
    loss: float
    """Step loss, mean over the step's applied updates."""
    reward_mean: float
    reward_std: float
    advantage_mean: float
    advantage_std: float
    advantage_min: float
    advantage_max: float
    clip_frac: float
    approx_kl: float
    """k3 estimate of KL(old || new) on the trained tokens, token mean over micro-batches."""
    kl: float
    """KL penalty to the reference model (nan without one)."""
    entropy: float
    grad_norm: float
    """Pre-clip global grad norm, mean over applied updates (nan if all were skipped)."""
    lr: float
    trained_tokens: int
    """Response tokens in the step (counted once however many epochs)."""
    num_sequences: int
    num_updates: int
    num_microbatches: int
    """Micro-batches of the step, over all updates."""
    routing_mismatch: float
    """Fraction of fed tokens whose router top-k differs from the engine's record in >= 1 MoE layer."""
    routing_mismatch_layer: float
    """Same, per (token, MoE layer) pair."""
    skipped: bool
    """At least one update of the step was skipped (non-finite loss or gradient)."""
    num_skipped_updates: int
    total_skipped_updates: int
    extra: dict[str, float] = field(default_factory=dict)
    """Loss-specific statistics (ratio and IS-weight stats, value loss, ...)."""

    def to_dict(self) -> dict[str, float | int | bool]:
        out = asdict(self)
        extra = out.pop("extra")
        return {**out, **{k: v for k, v in extra.items() if k not in out}}


def _merge(dst: MetricBag, src: MetricBag, *, sums_to_means: bool = False) -> None:
    """Fold `src` into `dst` keeping each metric's reduction. Micro-batches of one update add up
    (a loss share is a SUM); across updates, `sums_to_means` averages those per-update totals."""
    for key, metric in src.metrics.items():
        if metric.reduce is Reduce.MEAN:
            if metric.weight:
                dst.add(key, metric.total / metric.weight, Reduce.MEAN, weight=metric.weight)
        elif metric.reduce is Reduce.SUM and sums_to_means:
            dst.add(key, metric.value(), Reduce.MEAN)
        else:
            dst.add(key, metric.value(), metric.reduce)


class Trainer:
    """Runs train steps on `model` (a `dora.models.DecoderLM` or anything with its forward API:
    `forward(input_ids_BS, attention_mask_BS=, position_ids_BS=, replay_BSLK=, return_hidden=True)`
    returning `.hidden_BSD`, plus `.lm_head` and `.config`)."""

    def __init__(self, model: nn.Module, algorithm: AlgorithmConfig, config: TrainerConfig, *,
                 backend: TrainerBackend | None = None, ref_model: nn.Module | None = None) -> None:
        self.algo = algorithm
        self.cfg = config
        self.loss_fn = LOSSES.get(algorithm.loss)(algorithm)
        self.estimator = ADVANTAGES.get(algorithm.advantage)()
        needs_values = bool(getattr(self.loss_fn, "needs_values", False))
        if backend is None:
            value_head = (ValueHead(model.config.hidden_size, config.value_hidden_size, seed=config.seed)
                          if needs_values else None)
            backend = TorchBackend(model, config, value_head=value_head)
        if needs_values and backend.value_head is None:
            raise ValueError(f"algorithm.loss={algorithm.loss!r} needs a value head but the backend has none")
        self.backend = backend
        model_cfg = model.config
        self.top_k = model_cfg.num_experts_per_tok if model_cfg.is_moe else 0
        self.replay = model_cfg.is_moe if algorithm.routing_replay is None else algorithm.routing_replay
        if self.replay and not model_cfg.is_moe:
            raise ValueError("algorithm.routing_replay=true but the model has no MoE layers")
        self.ref_model: nn.Module | None = None
        if algorithm.kl_coef > 0:
            ref = copy.deepcopy(backend.policy) if ref_model is None else ref_model
            self.ref_model = ref.to(backend.device).eval().requires_grad_(False)
        self.step_count = 0
        self.total_skipped = 0

    # ------------------------------------------------------------------ public API

    def train_step(self, batch: Batch) -> TrainMetrics:
        trajectories = batch.trajectories
        self._validate(trajectories)
        algo = self.algo
        fields: dict[str, list[torch.Tensor]] = {
            "behavior_logprobs": [t.behavior_logprobs.float() for t in trajectories]}
        # With one update per step the proximal policy is the current one: no extra pass needed.
        need_proximal = algo.off_policy is not OffPolicy.behavior and algo.updates_per_step > 1
        fields.update(self._start_of_step_pass(trajectories, proximal=need_proximal,
                                               values=self.estimator.needs_values, ref=self.ref_model is not None))
        adv = self.estimator(batch.groups, algo, fields.get("old_values"))
        batch.advantages = adv.advantages
        fields["advantages"] = adv.advantages
        if adv.returns is not None:
            fields["returns"] = adv.returns

        bag = MetricBag()
        updates, num_microbatches, skipped_updates = 0, 0, 0
        for epoch in range(algo.ppo_epochs):
            for indices in self._minibatches(len(trajectories), epoch):
                subset = [trajectories[i] for i in indices]
                sub_fields = {name: [values[i] for i in indices] for name, values in fields.items()}
                sub_fields["weights"] = aggregation_weights([t.num_tokens for t in subset], algo.aggregation,
                                                            seq_norm_constant=algo.seq_norm_constant)
                microbatches = build_microbatches(subset, sub_fields, max_tokens=self.cfg.max_tokens_per_microbatch,
                                                  require_routing=self.replay)
                skipped = self._update(microbatches, bag, measure_routing=epoch == 0)
                updates += 1
                num_microbatches += len(microbatches)
                skipped_updates += skipped
        self.total_skipped += skipped_updates
        self.step_count += 1
        return self._metrics(batch, bag, updates, num_microbatches, skipped_updates)

    def publish_weights(self) -> dict[str, torch.Tensor]:
        """The policy's weights in the model's state_dict naming (detached, contiguous, CPU)."""
        return self.backend.publish_state_dict()

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed trainer needs: backend state, counters and the frozen reference model
        (the weights it was started from, which a resumed run must not replace by its own)."""
        return {"backend": self.backend.state_dict(), "step_count": self.step_count,
                "total_skipped": self.total_skipped,
                "ref_model": None if self.ref_model is None else self.ref_model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state.get("ref_model") is None) != (self.ref_model is None):
            raise ValueError("trainer state and this trainer disagree on keeping a reference model "
                             "(algorithm.kl_coef changed between save and resume?)")
        self.backend.load_state_dict(state["backend"])
        self.step_count = int(state["step_count"])
        self.total_skipped = int(state["total_skipped"])
        if self.ref_model is not None:
            self.ref_model.load_state_dict(state["ref_model"])

    # ------------------------------------------------------------------ steps of train_step

    def _validate(self, trajectories: list[Trajectory]) -> None:
        if not trajectories:
            raise ValueError("train_step got a batch without trajectories")
        vocab = self.backend.policy.config.vocab_size
        for t in trajectories:
            where = f"group {t.group_id} sample {t.sample_idx}"
            if t.finish_reason is FinishReason.ABORT:
                raise ValueError(f"{where} was aborted; aborted trajectories are never trained on")
            if t.num_tokens < 1:
                raise ValueError(f"{where} has an empty response")
            if t.behavior_logprobs.shape != (t.num_tokens,):
                raise ValueError(f"{where}: behavior_logprobs has shape {list(t.behavior_logprobs.shape)}, "
                                 f"expected [{t.num_tokens}]")
            ids = t.prompt_ids + t.response_ids
            if min(ids) < 0 or max(ids) >= vocab:
                raise ValueError(f"{where} has token ids outside the vocabulary [0, {vocab})")

    def _minibatches(self, num_trajectories: int, epoch: int) -> Iterator[list[int]]:
        """Trajectory indices of each update of one epoch: all of them, or a seeded shuffle cut into
        `num_minibatches` near-equal parts."""
        n = self.algo.num_minibatches
        if n == 1:
            yield list(range(num_trajectories))
            return
        if n > num_trajectories:
            raise ValueError(f"algorithm.num_minibatches ({n}) exceeds the step's {num_trajectories} trajectories")
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.step_count * 1009 + epoch)
        order = torch.randperm(num_trajectories, generator=g)
        for part in torch.tensor_split(order, n):
            yield sorted(part.tolist())

    @torch.no_grad()
    def _start_of_step_pass(self, trajectories: list[Trajectory], *, proximal: bool, values: bool,
                            ref: bool) -> dict[str, list[torch.Tensor]]:
        """Per-trajectory [T] tensors computed with the weights at the start of the step."""
        if not (proximal or values or ref):
            return {}
        out: dict[str, list[torch.Tensor | None]] = {}
        for name, wanted in (("proximal_logprobs", proximal), ("old_values", values), ("ref_logprobs", ref)):
            if wanted:
                out[name] = [None] * len(trajectories)
        for mb in build_microbatches(trajectories, {}, max_tokens=self.cfg.max_tokens_per_microbatch,
                                     require_routing=self.replay):
            mb = mb.to(self.backend.device)
            per_token: dict[str, torch.Tensor] = {}
            if proximal or values:
                logprobs_N, _, values_N, _ = self._forward(self.backend.policy, mb, entropy=False, values=values)
                if proximal:
                    per_token["proximal_logprobs"] = logprobs_N
                if values:
                    per_token["old_values"] = values_N
            if ref:
                per_token["ref_logprobs"] = self._forward(self.ref_model, mb, entropy=False, values=False)[0]
            for name, tensor_N in per_token.items():
                for i, piece_T in zip(mb.traj_indices, tensor_N.float().cpu().split(mb.lengths)):
                    out[name][i] = piece_T
        return out  # type: ignore[return-value]

    def _forward(self, model: nn.Module, mb: MicroBatch, *, entropy: bool, values: bool,
                 measure_routing: bool = False):
        """-> (logprobs_N, entropy_N | None, values_N | None, RoutingMismatch | None)."""
        probe = RouterTopkProbe(model, self.top_k) if measure_routing and mb.replay_BSLK is not None else None
        with probe if probe is not None else nullcontext():
            out = model(mb.input_ids_BS, attention_mask_BS=mb.attention_mask_BS, position_ids_BS=mb.position_ids_BS,
                        replay_BSLK=mb.replay_BSLK if self.replay else None, return_hidden=True)
        hidden_ND = out.hidden_BSD[mb.rows_N, mb.cols_N]
        lm_head = model.lm_head
        logprobs_N, entropy_N = chunked_logprobs(hidden_ND, lm_head.weight, mb.targets_N, bias_V=lm_head.bias,
                                                 temperature=self.algo.temperature,
                                                 chunk_size=self.cfg.logprob_chunk_size, with_entropy=entropy)
        values_N = None
        if values:
            head_in_ND = hidden_ND if self.cfg.value_trunk_grad else hidden_ND.detach()
            values_N = self.backend.value_head(head_in_ND)
        mismatch = None
        if probe is not None:
            topk_BSLK = probe.topk_BSLK(*mb.input_ids_BS.shape)
            mismatch = routing_mismatch(mb.replay_BSLK, topk_BSLK, mb.attention_mask_BS)
        return logprobs_N, entropy_N, values_N, mismatch

    def _update(self, microbatches: list[MicroBatch], bag: MetricBag, *, measure_routing: bool) -> int:
        """One optimizer update over `microbatches` (gradients accumulate); returns 1 if skipped."""
        entropy_grad = self.algo.entropy_coef > 0
        needs_values = self.backend.value_head is not None
        update_bag = MetricBag()
        loss_total = 0.0
        for mb in microbatches:
            mb = mb.to(self.backend.device)
            logprobs_N, entropy_N, values_N, mismatch = self._forward(
                self.backend.policy, mb, entropy=True, values=needs_values, measure_routing=measure_routing)
            f = mb.fields
            inputs = LossInputs(
                logprobs_N=logprobs_N, behavior_logprobs_N=f["behavior_logprobs"], advantages_N=f["advantages"],
                weights_N=f["weights"],
                proximal_logprobs_N=f.get("proximal_logprobs", logprobs_N.detach()),
                ref_logprobs_N=f.get("ref_logprobs"),
                entropy_N=entropy_N if entropy_grad else entropy_N.detach(),
                values_N=values_N, old_values_N=f.get("old_values"), returns_N=f.get("returns"))
            out = self.loss_fn(inputs)
            if not torch.isfinite(out.loss.detach()):
                self.backend.zero_grad()
                log.warning("train step %d: non-finite loss (%s) in a micro-batch of groups %s; update skipped",
                            self.step_count, out.loss.item(), sorted({int(i) for i in mb.traj_indices}))
                return 1
            self.backend.backward(out.loss)
            loss_total += out.loss.item()
            _merge(update_bag, out.metrics)
            if mismatch is not None:
                update_bag.add("routing_mismatch", mismatch.tokens_differing / max(1, mismatch.num_tokens),
                               weight=mismatch.num_tokens)
                update_bag.add("routing_mismatch_layer",
                               mismatch.token_layers_differing / max(1, mismatch.num_token_layers),
                               weight=mismatch.num_token_layers)
        result = self.backend.step()
        bag.add("lr", result.lr)
        if result.skipped:
            log.warning("train step %d: non-finite gradient norm (%s); update skipped", self.step_count,
                        result.grad_norm)
            return 1
        _merge(bag, update_bag, sums_to_means=True)
        bag.add("loss", loss_total)
        bag.add("grad_norm", result.grad_norm)
        return 0

    def _metrics(self, batch: Batch, bag: MetricBag, updates: int, num_microbatches: int,
                 skipped_updates: int) -> TrainMetrics:
        values = bag.compute()
        rewards = torch.tensor([float(t.reward) for t in batch.trajectories])
        adv = torch.cat(batch.advantages)
        nan = math.nan
        core = {"loss", "lr", "grad_norm", "clip_frac", "approx_kl", "kl", "entropy", "routing_mismatch",
                "routing_mismatch_layer"}
        return TrainMetrics(
            step=self.step_count - 1,
            loss=values.get("loss", nan),
            reward_mean=rewards.mean().item(),
            reward_std=rewards.std().item() if rewards.numel() > 1 else 0.0,
            advantage_mean=adv.mean().item(),
            advantage_std=adv.std().item() if adv.numel() > 1 else 0.0,
            advantage_min=adv.min().item(),
            advantage_max=adv.max().item(),
            clip_frac=values.get("clip_frac", nan),
            approx_kl=values.get("approx_kl", nan),
            kl=values.get("kl", nan),
            entropy=values.get("entropy", nan),
            grad_norm=values.get("grad_norm", nan),
            lr=values.get("lr", nan),
            trained_tokens=batch.num_tokens,
            num_sequences=len(batch.trajectories),
            num_updates=updates,
            num_microbatches=num_microbatches,
            routing_mismatch=values.get("routing_mismatch", nan),
            routing_mismatch_layer=values.get("routing_mismatch_layer", nan),
            skipped=skipped_updates > 0,
            num_skipped_updates=skipped_updates,
            total_skipped_updates=self.total_skipped,
            extra={k: v for k, v in values.items() if k not in core},
        )
