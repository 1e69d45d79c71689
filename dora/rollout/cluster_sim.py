"""Cost models of a GPU cluster for the discrete-event simulator (`dora.rollout.sim`).

`tools/simulate.py` uses this to project dora's scheduler to cluster scale: the shipped `Scheduler`
(controller + pool + buffer) runs unchanged inside `dora.rollout.sim.simulate`; this module only says
how long things take on the simulated hardware:

- an engine is a tensor-parallel group of `tp` accelerators (one data-parallel replica). A decode
  step reads each running version's weights once (memory-bound floor), costs 2 * params FLOPs per
  sequence (compute-bound slope), reads the K and V of every context token, and pays a fixed
  per-step overhead for the tensor-parallel all-reduces (`DecodeCost`);
- prefill is compute-bound: 2 * params * prompt tokens;
- a train step costs (6 * params * trained tokens + causal attention) / (train accelerators * peak
  * MFU), attention being 6 * layers * heads * head_dim * S^2 for a sequence of S tokens (forward and
  backward over the S^2 / 2 query-key pairs; the FLOPs MFU counts, as in PaLM's appendix B). For
  Qwen2.5-32B a 30K-token sequence's attention adds 30% to its dense FLOPs (15% on average over the
  dora_paper lengths). The loss uses the engines' behaviour log-probs, so there is no separate
  log-prob recomputation pass;
- weight sync is bytes / bandwidth + latency: over NVLink inside the node when training and
  generation share the accelerators (colocated), over the nodes' network otherwise;
- KV-cache capacity bounds the sequences an engine runs at once;
- a migrated group's KV cache (every context token's K and V) moves between engines over the nodes'
  network, plus the fixed cost of a weight update (a conservative stand-in for setting up a
  point-to-point transfer).

Arrangements: `colocated` (generation and training take turns on all accelerators: the synchronous
baseline's natural home), or `disaggregated` (`rollout_engines` engines generate while the other
accelerators train: needed by every mode that overlaps them). Every constant below is a hardware
specification, a published model size or a stated assumption; none is fitted to a speedup.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from dora.rollout.sim import DecodeCost


@dataclass(slots=True, frozen=True)
class Accelerator:
    name: str
    hbm_bytes: float
    hbm_bytes_per_s: float
    bf16_flops: float
    """Dense (no sparsity) bf16 peak."""
    nvlink_bytes_per_s: float
    """Per accelerator, one direction."""
    node_net_bytes_per_s: float
    """Network bandwidth of one 8-accelerator node (all NICs)."""


H800 = Accelerator(
    # NVIDIA H100/H800 SXM5 datasheet: 80 GB HBM3 at 3.35 TB/s, bf16 dense 989.5 TFLOPS (1,979 with
    # sparsity). The H800 is the export variant of the H100 SXM with NVLink cut to 400 GB/s.
    name="H800-SXM5-80GB", hbm_bytes=80e9, hbm_bytes_per_s=3.35e12, bf16_flops=989.5e12,
    nvlink_bytes_per_s=200e9,  # 400 GB/s bidirectional
    # Assumption: 8 x 400 Gb/s InfiniBand NICs per node (a common H800 cluster build), 400 GB/s.
    node_net_bytes_per_s=400e9,
)


@dataclass(slots=True, frozen=True)
class DenseModel:
    name: str
    params: float
    num_layers: int
    num_heads: int
    """Query heads (attention FLOPs)."""
    num_kv_heads: int
    """Key/value heads (KV-cache bytes)."""
    head_dim: int
    bytes_per_param: int = 2  # bf16 weights and KV cache

    @property
    def weight_bytes(self) -> float:
        return self.params * self.bytes_per_param

    @property
    def kv_bytes_per_token(self) -> float:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.bytes_per_param


QWEN25_32B = DenseModel(
    # Qwen2.5-32B (Qwen2.5 technical report, arXiv 2412.15115; config.json): 32.5B parameters,
    # 64 layers, GQA with 40 query heads and 8 KV heads of dimension 128.
    name="Qwen2.5-32B", params=32.5e9, num_layers=64, num_heads=40, num_kv_heads=8, head_dim=128,
)


@dataclass(slots=True, frozen=True)
class Efficiency:
    """Stated assumptions about how close real kernels get to the specifications."""

    hbm: float = 0.8
    """Achieved / peak HBM bandwidth of memory-bound decode kernels."""
    decode_mfu: float = 0.6
    """Achieved / peak FLOPs of decode matmuls once compute-bound."""
    prefill_mfu: float = 0.5
    train_mfu: float = 0.35
    """Model FLOPs utilisation of RL training (variable-length sequences, long context): below the
    ~40-50% of well-tuned pre-training."""
    tp_collective_s: float = 10e-6
    """Latency of one small all-reduce inside a node (NCCL on NVLink, order of 10 us); a decoder
    layer does two per step under tensor parallelism."""
    kv_memory_fraction: float = 0.9
    """Share of accelerator memory the engine may use (vLLM's gpu_memory_utilization default)."""
    max_seqs_cap: int = 256
    """Upper bound on sequences per engine (vLLM's max_num_seqs default)."""
    sync_latency_s: float = 0.5
    """Fixed cost of a weight update (barrier, bucket set-up), on top of bytes / bandwidth."""


@dataclass(slots=True, frozen=True)
class Cluster:
    accelerator: Accelerator
    model: DenseModel
    num_accelerators: int
    tp: int
    """Accelerators per engine (tensor parallel)."""
    eff: Efficiency = field(default_factory=Efficiency)

    def __post_init__(self) -> None:
        if self.tp < 1 or self.num_accelerators % self.tp:
            raise ValueError(f"num_accelerators ({self.num_accelerators}) must be a multiple of tp ({self.tp})")

    @property
    def max_engines(self) -> int:
        return self.num_accelerators // self.tp

    def decode_cost(self) -> DecodeCost:
        a, m, e, tp = self.accelerator, self.model, self.eff, self.tp
        hbm = tp * a.hbm_bytes_per_s * e.hbm
        return DecodeCost(
            weight_read_s=m.weight_bytes / hbm,
            flop_s_per_seq=2 * m.params / (tp * a.bf16_flops * e.decode_mfu),
            overhead_s=(2 * m.num_layers * e.tp_collective_s) if tp > 1 else 0.0,
            kv_read_s_per_token=m.kv_bytes_per_token / hbm,
            prefill_s_per_token=2 * m.params / (tp * a.bf16_flops * e.prefill_mfu),
        )

    def kv_capacity_tokens(self, versions: int) -> float:
        """Context tokens one engine's KV cache holds next to `versions` copies of the weights."""
        free = self.tp * self.accelerator.hbm_bytes * self.eff.kv_memory_fraction - versions * self.model.weight_bytes
        if free <= 0:
            raise ValueError(f"{versions} copies of {self.model.name} do not fit on {self.tp} x {self.accelerator.name}")
        return free / self.model.kv_bytes_per_token

    def max_seqs(self, versions: int, tokens_per_seq: float, group_size: int) -> int:
        """Sequences per engine: KV capacity over the mean context of a running sequence, capped;
        rounded down to whole groups (groups are placed whole)."""
        seqs = min(self.eff.max_seqs_cap, int(self.kv_capacity_tokens(versions) / tokens_per_seq))
        return max(group_size, seqs - seqs % group_size)

    def train_s(self, tokens: int, accelerators: int, tokens_sq: float = 0.0) -> float:
        """A train step on `tokens` tokens whose sequences' squared lengths sum to `tokens_sq`."""
        a, e, m = self.accelerator, self.eff, self.model
        attention = 6 * m.num_layers * m.num_heads * m.head_dim * tokens_sq
        return (6 * m.params * tokens + attention) / (accelerators * a.bf16_flops * e.train_mfu)

    def sync_s(self, colocated: bool) -> float:
        """Weight update of one engine: every engine receives in parallel (its own links)."""
        if colocated:
            bandwidth = self.tp * self.accelerator.nvlink_bytes_per_s  # reshard inside the node
        else:
            bandwidth = self.accelerator.node_net_bytes_per_s * self.tp / 8
        return self.model.weight_bytes / bandwidth + self.eff.sync_latency_s

    def migrate_s(self, context_tokens: int) -> float:
        """Moving running sequences with `context_tokens` of KV cache from one engine to another
        (disaggregated engines: one node each at TP8, so over the network)."""
        bandwidth = self.accelerator.node_net_bytes_per_s * min(self.tp, 8) / 8
        return context_tokens * self.model.kv_bytes_per_token / bandwidth + self.eff.sync_latency_s


@dataclass(slots=True, frozen=True)
class LengthModel:
    """Long-tailed response lengths: a per-prompt difficulty (lognormal) times a per-sample lognormal
    factor, plus a share of samples that never stop (repetition loops) and run to the cap; all
    clipped at `max_tokens`. Drawn from a hash of ints, so the same prompt gets the same lengths in
    every mode."""

    median_tokens: float
    prompt_sigma: float
    sample_sigma: float
    runaway_frac: float
    max_tokens: int
    seed: int = 0

    def lengths(self, prompt_id: int, num_samples: int) -> list[int]:
        """The lengths of samples 0..num_samples-1 of a prompt (one seeded stream per prompt)."""
        # Ints only: hashing a str would vary with PYTHONHASHSEED.
        rng = random.Random(hash((self.seed, prompt_id)))
        scale = self.median_tokens * math.exp(rng.gauss(0.0, self.prompt_sigma))
        out = []
        for _ in range(num_samples):
            runaway = rng.random() < self.runaway_frac
            body = int(scale * math.exp(rng.gauss(0.0, self.sample_sigma)))
            out.append(self.max_tokens if runaway else max(1, min(self.max_tokens, body)))
        return out

    def moments(self, num_prompts: int = 2000, group_size: int = 16) -> tuple[float, float]:
        """(E[L], E[L^2]) over a fixed sample of prompts."""
        lengths = [x for p in range(num_prompts) for x in self.lengths(p, group_size)]
        return sum(lengths) / len(lengths), sum(x * x for x in lengths) / len(lengths)


@dataclass(slots=True, frozen=True)
class Arrangement:
    colocated: bool
    rollout_engines: int
    """Engines generating; the cluster's other accelerators train (all of them when colocated)."""

    def describe(self, cluster: Cluster) -> str:
        gen = self.rollout_engines * cluster.tp
        if self.colocated:
            return f"colocated: {gen} accel. generate, then all {cluster.num_accelerators} train"
        return f"split: {gen} accel. generate, {cluster.num_accelerators - gen} train"

    def train_accelerators(self, cluster: Cluster) -> int:
        return cluster.num_accelerators if self.colocated else cluster.num_accelerators - self.rollout_engines * cluster.tp


@dataclass(slots=True)
class ClusterWorkload:
    """A `SimWorkloadLike` built from a cluster, an arrangement and a length model."""

    cluster: Cluster
    arrangement: Arrangement
    lengths: LengthModel
    num_prompts: int
    prompt_len: int
    group_size: int = 16
    num_engines: int = 0
    _cost: DecodeCost | None = None
    _cache: dict[int, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        a = self.arrangement
        if not 1 <= a.rollout_engines <= self.cluster.max_engines:
            raise ValueError(f"rollout_engines must be in 1..{self.cluster.max_engines}, got {a.rollout_engines}")
        if not a.colocated and a.train_accelerators(self.cluster) < 1:
            raise ValueError("a disaggregated arrangement needs accelerators left to train on")
        self.num_engines = a.rollout_engines
        self._cost = self.cluster.decode_cost()

    def length(self, prompt_id: int, group_id: int, sample_idx: int) -> int:
        drawn = self._cache.get(prompt_id)
        if drawn is None:
            drawn = self._cache[prompt_id] = self.lengths.lengths(prompt_id, self.group_size)
        return drawn[sample_idx]

    def decode_cost(self, engine_id: int) -> DecodeCost:
        assert self._cost is not None
        return self._cost

    def step_time(self, step: int, tokens: int, tokens_sq: int) -> float:
        return self.cluster.train_s(tokens, self.arrangement.train_accelerators(self.cluster), tokens_sq)

    def load_time(self, version: int) -> float:
        return self.cluster.sync_s(self.arrangement.colocated)

    def migrate_time(self, context_tokens: int) -> float:
        return self.cluster.migrate_s(context_tokens)
