"""The torch engine's continuous-batching scheduler: which tokens of which sequences each step feeds.

Where it sits: `TorchEngine` owns one `Scheduler`. Each step it asks for a `StepPlan` (admission of
waiting groups into free slots, then the packed rows for `PackedForward`), runs the forward and the
sampler, and hands the sampled tokens back to `Scheduler.commit`, which advances sequences and
returns the ones that finished.

Policy (one step):
1. Every decoding sequence feeds its last token (decodes first, so running sequences never stall).
2. The rest of the token budget (`max_num_batched_tokens`) goes to prompt prefill, oldest admitted
   group first; a prompt longer than what is left is cut into chunks over several steps.
3. A waiting group is admitted (FIFO) when `num_samples` slots are free and budget is left. Its
   prompt is prefilled once, in its first sample's slot; when the prompt is done, the prompt's keys,
   values and routing ids are copied into the other samples' slots and every sample draws its first
   token (with its own seed) from the same logits.
Rows are ordered version by version so each live version owns one contiguous row range.

Shape legend: N fed tokens, R sampled rows, S slots, M max_model_len, Lk keys.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from dora.engines.kv_cache import SlotAllocator, SlotCache
from dora.engines.sampler import SamplingBatch
from dora.engines.torch_forward import DecodeLayout, PrefillLayout, Segments, StepInputs
from dora.engines.versions import LiveVersions
from dora.types import FinishReason, PromptGroup, SamplingParams, Trajectory


@dataclass(slots=True, eq=False)
class GroupState:
    group: PromptGroup
    version: int
    sampling: SamplingParams
    base_seed: int
    queued_at: float
    seqs: list[SeqState] = field(default_factory=list)
    prefilled: int = 0
    """Prompt tokens whose keys/values are in the cache (in the first sample's slot)."""
    stop_ids: frozenset[int] = frozenset()

    @property
    def prompt_len(self) -> int:
        return len(self.group.prompt_ids)


@dataclass(slots=True, eq=False)
class SeqState:
    group: GroupState
    sample_idx: int
    slot: int
    seed: int
    length: int = 0
    """Tokens in the slot: prompt + generated (the last generated one is not fed yet)."""
    num_generated: int = 0
    first_token_at: float = 0.0


@dataclass(slots=True)
class SeqRecord:
    """One running sample on its way to another engine: its slot's rows up to `length` and where
    its sampler stands (the sampler is a pure function of (seed, num_generated))."""

    sample_idx: int
    seed: int
    length: int
    num_generated: int
    first_token_at: float
    tokens_M: torch.Tensor
    logprobs_M: torch.Tensor
    kv_LMCD: torch.Tensor
    routing_MLK: torch.Tensor | None


@dataclass(slots=True)
class MigratingGroup:
    """What `Scheduler.export_group` takes out of an engine and `import_group` puts into another one
    (CPU tensors, picklable). `seqs` is None for a group whose prompt was not prefilled yet: it
    starts over on the other engine (same seeds, so the same samples)."""

    group: PromptGroup
    version: int
    sampling: SamplingParams
    base_seed: int
    queued_at: float
    stop_ids: frozenset[int]
    seqs: list[SeqRecord] | None

    @classmethod
    def of(cls, g: GroupState, seqs: list[SeqRecord] | None) -> MigratingGroup:
        return cls(g.group, g.version, g.sampling, g.base_seed, g.queued_at, g.stop_ids, seqs)

    @property
    def num_samples(self) -> int:
        return self.group.num_samples if self.seqs is None else len(self.seqs)

    def state(self, prefilled: int = 0) -> GroupState:
        """The group's schedule entry on the receiving engine (no samples yet)."""
        return GroupState(group=self.group, version=self.version, sampling=self.sampling, base_seed=self.base_seed,
                          queued_at=self.queued_at, prefilled=prefilled, stop_ids=self.stop_ids)


@dataclass(slots=True)
class StepPlan:
    inputs: StepInputs
    sampling: SamplingBatch
    sampled: list[SeqState]
    """The sequence of each sampled row, in row order."""
    new_flat_R: torch.Tensor
    """Where each sampled token goes in the slot caches (slot * M + position)."""
    prefill_done: list[GroupState]
    """Groups whose prompt completes this step (prompt copied to their other samples' slots)."""
    prefill_progress: list[tuple[GroupState, int]]
    num_fed: int


def _ints(values: list[int] | np.ndarray, device: torch.device) -> torch.Tensor:
    """int64 tensor of a host list: through numpy, ~3x cheaper than torch.tensor(list) per step."""
    t = torch.from_numpy(np.asarray(values, dtype=np.int64))
    return t if device.type == "cpu" else t.to(device)


def _floats(values: list[float], device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(values, dtype=np.float32))
    return t if device.type == "cpu" else t.to(device)


def _split_long(lengths: np.ndarray, num_slots: int) -> int:
    """Decode attention reads keys [0, Lk) of every slot in the view, so one long sequence would make
    all slots read its length. Pick Lk minimising the keys read: slots longer than Lk are served by a
    second attention call over their own (gathered, so counted twice) keys. -> Lk (the shortest of the
    cheapest; the longest length when no split pays)."""
    by_length = np.sort(lengths)
    longest = int(by_length[-1])
    keys = by_length[:-1]
    num_long = np.arange(keys.shape[0], 0, -1)  # sequences longer than keys[j] if it is a cut
    cost = np.where(by_length[1:] > keys, num_slots * keys + 2 * num_long * longest, np.iinfo(np.int64).max)
    if not cost.shape[0] or cost.min() >= num_slots * longest:
        return longest
    return int(keys[int(np.argmin(cost))])


class Scheduler:
    def __init__(self, cache: SlotCache, max_num_batched_tokens: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.cache = cache
        self.dtype = dtype
        M = cache.max_len
        # Row p of the length masks is windows[M - 1 - p]: 0 for keys 0..p, -inf after (see _length_mask).
        steps = torch.cat([torch.zeros(M, dtype=dtype, device=device), torch.full((M,), float("-inf"), dtype=dtype,
                                                                                   device=device)])
        self._mask_windows_WM = steps.unfold(0, M, 1)
        self.slots = SlotAllocator(cache.num_slots)
        self.budget = max_num_batched_tokens
        self.device = device
        self.waiting: collections.deque[GroupState] = collections.deque()
        self.prefilling: list[GroupState] = []
        self.decoding: dict[int, list[SeqState]] = {}
        """version -> sequences producing tokens, in slot order."""
        self.arriving: collections.deque[MigratingGroup] = collections.deque()
        """Migrated groups waiting for free slots (admitted before any waiting group)."""

    # ------------------------------------------------------------------ queries

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.arriving or any(self.decoding.values()))

    def running_per_version(self) -> dict[int, int]:
        counts = {v: len(seqs) for v, seqs in self.decoding.items() if seqs}
        for g in self.prefilling:
            counts[g.version] = counts.get(g.version, 0) + len(g.seqs)
        for m in self.arriving:
            counts[m.version] = counts.get(m.version, 0) + m.num_samples
        return counts

    def num_waiting_seqs(self) -> int:
        return sum(g.group.num_samples for g in self.waiting)

    # ------------------------------------------------------------------ planning

    def _admit(self, budget_left: int) -> None:
        while self.arriving and self.slots.num_free >= len(self.arriving[0].seqs or ()):
            self._place_arrived(self.arriving.popleft())
        if self.arriving:
            return  # arrived groups first: they hold KV caches and were admitted before any waiting group
        while self.waiting and budget_left > 0 and self.slots.num_free >= self.waiting[0].group.num_samples:
            g = self.waiting.popleft()
            slots = self.slots.allocate(g.group.num_samples)
            g.seqs = [SeqState(group=g, sample_idx=i, slot=s, seed=g.base_seed + i, length=g.prompt_len)
                      for i, s in enumerate(slots)]
            self.cache.tokens_SM[slots[0], :g.prompt_len] = torch.tensor(g.group.prompt_ids, dtype=torch.long)
            self.prefilling.append(g)
            budget_left -= g.prompt_len

    def plan(self, live: LiveVersions) -> StepPlan | None:
        num_decode = sum(len(s) for s in self.decoding.values())
        self._admit(self.budget - num_decode - sum(g.prompt_len - g.prefilled for g in self.prefilling))
        budget_left = self.budget - num_decode
        chunks: dict[int, list[tuple[GroupState, int]]] = collections.defaultdict(list)
        for g in self.prefilling:
            if budget_left <= 0:
                break
            size = min(g.prompt_len - g.prefilled, budget_left)
            chunks[g.version].append((g, size))
            budget_left -= size
        if not num_decode and not chunks:
            return None

        M = self.cache.max_len
        flat: list[int] = []
        segments: Segments = []
        dec_rows: list[int] = []
        dec_seqs: list[SeqState] = []
        pre_chunks: list[tuple[int, int, int, int]] = []  # (first row, size, slot, first position)
        sampled: list[SeqState] = []
        sample_rows: list[int] = []
        sample_segments: Segments = []
        prefill_done: list[GroupState] = []
        prefill_progress: list[tuple[GroupState, int]] = []
        for j, version in enumerate(live.versions):
            start, sample_start = len(flat), len(sample_rows)
            decoding = self.decoding.get(version, ())  # kept in slot order
            dec_rows.extend(range(start, start + len(decoding)))
            sample_rows.extend(range(start, start + len(decoding)))
            dec_seqs.extend(decoding)
            sampled.extend(decoding)
            flat.extend([s.slot * M + s.length - 1 for s in decoding])
            for g, size in chunks.get(version, ()):
                slot = g.seqs[0].slot
                pre_chunks.append((len(flat), size, slot, g.prefilled))
                flat.extend(range(slot * M + g.prefilled, slot * M + g.prefilled + size))
                prefill_progress.append((g, size))
                if g.prefilled + size == g.prompt_len:
                    prefill_done.append(g)
                    sample_rows.extend([len(flat) - 1] * len(g.seqs))
                    sampled.extend(g.seqs)
            if len(flat) > start:
                segments.append((j, start, len(flat)))
            if len(sample_rows) > sample_start:
                sample_segments.append((j, sample_start, len(sample_rows)))

        dev = self.device
        flat_np = np.array(flat, dtype=np.int64)
        flat_N = _ints(flat_np, dev)
        pos_N = _ints(flat_np % M, dev)
        vidx_N = None
        if len(segments) > 1:
            vidx_N = torch.cat([torch.full((b - a,), j, dtype=torch.long, device=dev) for j, a, b in segments])
        inputs = StepInputs(
            flat_N=flat_N, pos_N=pos_N, tokens_N=self.cache.tokens_SM.view(-1).index_select(0, flat_N),
            segments=segments, vidx_N=vidx_N,
            decode=self._decode_layout(dec_rows, dec_seqs) if dec_rows else None,
            prefill=self._prefill_layout(pre_chunks) if pre_chunks else None,
            sample_rows_R=_ints(sample_rows, dev), sample_segments=sample_segments)
        new_flat = [s.slot * M + s.length for s in sampled]
        return StepPlan(inputs=inputs, sampling=self._sampling_batch(sampled), sampled=sampled,
                        new_flat_R=_ints(new_flat, dev),
                        prefill_done=prefill_done, prefill_progress=prefill_progress, num_fed=len(flat))

    def _decode_layout(self, rows: list[int], seqs: list[SeqState]) -> DecodeLayout:
        slots_B = np.fromiter((s.slot for s in seqs), dtype=np.int64, count=len(seqs))
        lengths_B = np.fromiter((s.length for s in seqs), dtype=np.int64, count=len(seqs))
        num_slots = int(slots_B.max()) + 1
        identity = (num_slots == len(seqs) and rows[-1] == len(rows) - 1
                    and bool((slots_B == np.arange(num_slots)).all()))
        num_keys = _split_long(lengths_B, num_slots)
        is_long_B = lengths_B > num_keys
        pos_S = np.zeros(num_slots, dtype=np.int64)  # slots without a decode row (or served by the long call) see key 0
        pos_S[slots_B[~is_long_B]] = lengths_B[~is_long_B] - 1
        dev = self.device
        long_slots = long_mask = None
        if is_long_B.any():
            long_slots = _ints(slots_B[is_long_B], dev)
            long_mask = self._length_mask(lengths_B[is_long_B] - 1)
        return DecodeLayout(rows_B=_ints(rows, dev), slots_B=_ints(slots_B, dev),
                            num_slots=num_slots, mask_S11Lk=self._length_mask(pos_S), identity=identity,
                            long_slots_b=long_slots, long_mask_b11Lk=long_mask)

    def _length_mask(self, last_pos: list[int] | np.ndarray) -> torch.Tensor:
        """Additive mask [len, 1, 1, max + 1] letting row r see keys 0..last_pos[r]. Additive rather
        than boolean: SDPA's CPU kernel takes it as is (a boolean mask gets converted)."""
        pos_S = np.asarray(last_pos, dtype=np.int64)
        rows_S = _ints(self.cache.max_len - 1 - pos_S, self.device)
        return self._mask_windows_WM[:, :int(pos_S.max()) + 1].index_select(0, rows_S)[:, None, None, :]

    def _prefill_layout(self, chunks: list[tuple[int, int, int, int]]) -> PrefillLayout:
        dev = self.device
        num_keys = max(pos0 + size for _, size, _, pos0 in chunks)
        if len(chunks) == 1:
            row, size, slot, pos0 = chunks[0]
            mask = None
            if pos0:
                query_pos = torch.arange(pos0, pos0 + size, device=dev)
                mask = (torch.arange(num_keys, device=dev)[None, :] <= query_pos[:, None])[None, None]
            return PrefillLayout(rows=slice(row, row + size), slots_P=torch.tensor([slot], device=dev),
                                 gather_PC=None, scatter_n=None, num_keys=num_keys, mask_P1CLk=mask,
                                 single_slot=slot)
        longest = max(size for _, size, _, _ in chunks)
        offsets = torch.tensor([0] + [size for _, size, _, _ in chunks[:-1]], device=dev).cumsum(0)
        sizes = torch.tensor([size for _, size, _, _ in chunks], device=dev)
        c_C = torch.arange(longest, device=dev)
        gather_PC = offsets[:, None] + torch.minimum(c_C[None, :], sizes[:, None] - 1)
        scatter_n = torch.cat([p * longest + torch.arange(size, device=dev) for p, (_, size, _, _) in enumerate(chunks)])
        mask = None  # whole prompts of one length (a batch of fresh prompts): plain causal attention
        if any(pos0 or size != longest for _, size, _, pos0 in chunks):
            pos0_P = torch.tensor([pos0 for _, _, _, pos0 in chunks], device=dev)
            query_pos_PC = pos0_P[:, None] + c_C[None, :]
            mask = (torch.arange(num_keys, device=dev)[None, None, :] <= query_pos_PC[:, :, None])[:, None]
        rows = torch.cat([torch.arange(row, row + size, device=dev) for row, size, _, _ in chunks])
        return PrefillLayout(rows=rows, slots_P=torch.tensor([slot for _, _, slot, _ in chunks], device=dev),
                             gather_PC=gather_PC, scatter_n=scatter_n, num_keys=num_keys, mask_P1CLk=mask,
                             single_slot=-1)

    def _sampling_batch(self, seqs: list[SeqState]) -> SamplingBatch:
        dev = self.device
        params = [s.group.sampling for s in seqs]
        all_greedy = all(p.temperature == 0 for p in params)
        any_truncation = any(p.top_p < 1 or p.top_k > 0 for p in params)
        if all_greedy:
            empty = torch.empty(0, device=dev)
            return SamplingBatch(empty, empty, empty, empty, empty, all_greedy=True, any_truncation=False)
        return SamplingBatch(
            temperature_B=_floats([p.temperature for p in params], dev),
            top_p_B=_floats([p.top_p for p in params], dev),
            top_k_B=_ints([p.top_k for p in params], dev),
            seed_B=_ints([s.seed for s in seqs], dev),
            counter_B=_ints([s.num_generated for s in seqs], dev),
            all_greedy=False, any_truncation=any_truncation)

    # ------------------------------------------------------------------ commit

    def commit(self, plan: StepPlan, tokens_R: torch.Tensor, logprobs_R: torch.Tensor,
               max_len: int) -> list[tuple[SeqState, FinishReason]]:
        """Record the sampled tokens; -> sequences that finished this step (slots still held)."""
        for g in plan.prefill_done:
            self.cache.copy_prefix(g.seqs[0].slot, [s.slot for s in g.seqs[1:]], g.prompt_len)
        self.cache.tokens_SM.view(-1).index_copy_(0, plan.new_flat_R, tokens_R)
        self.cache.logprobs_SM.view(-1).index_copy_(0, plan.new_flat_R, logprobs_R)
        for g, size in plan.prefill_progress:
            g.prefilled += size
        for g in plan.prefill_done:
            self.prefilling.remove(g)
            decoding = self.decoding.setdefault(g.version, [])
            decoding.extend(g.seqs)
            decoding.sort(key=lambda s: s.slot)

        now = time.monotonic()
        finished: list[tuple[SeqState, FinishReason]] = []
        for s, token in zip(plan.sampled, tokens_R.tolist()):
            s.length += 1
            s.num_generated += 1
            if s.num_generated == 1:
                s.first_token_at = now
            g = s.group
            if token in g.stop_ids:
                finished.append((s, FinishReason.STOP))
            elif s.num_generated >= g.sampling.max_new_tokens or s.length >= max_len:
                finished.append((s, FinishReason.LENGTH))
        for s, _ in finished:
            self.decoding[s.group.version].remove(s)
        return finished

    # ------------------------------------------------------------------ abort and release

    def remove_group(self, group_id: int) -> list[SeqState] | None:
        """Take every sample of `group_id` out of the schedule; None if the engine does not hold it."""
        for g in self.waiting:
            if g.group.group_id == group_id:
                self.waiting.remove(g)
                g.seqs = [SeqState(group=g, sample_idx=i, slot=-1, seed=g.base_seed + i, length=g.prompt_len)
                          for i in range(g.group.num_samples)]
                return g.seqs
        for g in self.prefilling:
            if g.group.group_id == group_id:
                self.prefilling.remove(g)
                return g.seqs
        for version, seqs in self.decoding.items():
            mine = [s for s in seqs if s.group.group.group_id == group_id]
            if mine:
                self.decoding[version] = [s for s in seqs if s.group.group.group_id != group_id]
                return mine
        for m in self.arriving:
            if m.group.group_id == group_id:
                self.arriving.remove(m)
                g = m.state()
                return [SeqState(group=g, sample_idx=r.sample_idx, slot=-1, seed=r.seed, length=r.length,
                                 num_generated=r.num_generated) for r in m.seqs or ()]
        return None

    # ------------------------------------------------------------------ migration

    def export_group(self, group_id: int) -> MigratingGroup | None:
        """Take every sample of `group_id` still held here out of the schedule, with what its slots
        hold (copied to the CPU; the slots are freed); None if the engine does not hold it."""
        for g in [*self.waiting, *self.prefilling]:
            if g.group.group_id == group_id:
                if g in self.waiting:
                    self.waiting.remove(g)
                else:
                    self.prefilling.remove(g)
                    for seq in g.seqs:
                        self.release(seq)
                return MigratingGroup.of(g, None)
        for m in self.arriving:
            if m.group.group_id == group_id:
                self.arriving.remove(m)
                return m
        for version, seqs in self.decoding.items():
            mine = [s for s in seqs if s.group.group.group_id == group_id]
            if not mine:
                continue
            self.decoding[version] = [s for s in seqs if s.group.group.group_id != group_id]
            c = self.cache
            records = []
            for s in mine:
                n = s.length
                routing = None if c.routing_SMLK is None else c.routing_SMLK[s.slot, :n].to("cpu", copy=True)
                records.append(SeqRecord(s.sample_idx, s.seed, n, s.num_generated, s.first_token_at,
                                         c.tokens_SM[s.slot, :n].to("cpu", copy=True),
                                         c.logprobs_SM[s.slot, :n].to("cpu", copy=True),
                                         c.kv_LSMCD[:, s.slot, :n].to("cpu", copy=True), routing))
                self.release(s)
            return MigratingGroup.of(mine[0].group, records)
        return None

    def import_group(self, m: MigratingGroup) -> None:
        """Take over a group exported by another engine: a group not prefilled yet waits first in
        line; running samples go on decoding from their records once slots are free."""
        if m.seqs is None:
            self.waiting.appendleft(m.state())
        elif m.seqs:
            self.arriving.append(m)

    def _place_arrived(self, m: MigratingGroup) -> None:
        assert m.seqs is not None
        c = self.cache
        g = m.state(prefilled=len(m.group.prompt_ids))
        for rec, slot in zip(m.seqs, self.slots.allocate(len(m.seqs))):
            n = rec.length
            c.tokens_SM[slot, :n] = rec.tokens_M.to(c.tokens_SM.device)
            c.logprobs_SM[slot, :n] = rec.logprobs_M.to(c.logprobs_SM.device)
            c.kv_LSMCD[:, slot, :n] = rec.kv_LMCD.to(device=c.kv_LSMCD.device, dtype=c.kv_LSMCD.dtype)
            if c.routing_SMLK is not None and rec.routing_MLK is not None:
                c.routing_SMLK[slot, :n] = rec.routing_MLK.to(c.routing_SMLK.device)
            g.seqs.append(SeqState(group=g, sample_idx=rec.sample_idx, slot=slot, seed=rec.seed, length=n,
                                   num_generated=rec.num_generated, first_token_at=rec.first_token_at))
        decoding = self.decoding.setdefault(m.version, [])
        decoding.extend(g.seqs)
        decoding.sort(key=lambda s: s.slot)

    def release(self, seq: SeqState) -> None:
        if seq.slot >= 0:
            self.slots.release(seq.slot)
            seq.slot = -1

    def trajectory(self, seq: SeqState, reason: FinishReason, engine_id: int) -> Trajectory:
        """Slice a sequence's record out of its slot (call before `release`)."""
        g = seq.group
        P, T = g.prompt_len, seq.num_generated
        response: list[int] = []
        logprobs = torch.zeros(0, dtype=torch.float32)
        routing = None
        if seq.slot >= 0 and T:
            response = self.cache.tokens_SM[seq.slot, P:P + T].tolist()
            logprobs = self.cache.logprobs_SM[seq.slot, P:P + T].to("cpu", copy=True)
            if self.cache.routing_SMLK is not None:
                routing = self.cache.routing_SMLK[seq.slot, :P + T - 1].to("cpu", copy=True)
        return Trajectory(
            group_id=g.group.group_id, sample_idx=seq.sample_idx, prompt_id=g.group.prompt_id,
            prompt_ids=list(g.group.prompt_ids), response_ids=response, behavior_logprobs=logprobs,
            version=g.version, min_version=g.version, max_version=g.version, finish_reason=reason,
            routing=routing, engine_id=engine_id, queued_at=g.queued_at, first_token_at=seq.first_token_at,
            finished_at=time.monotonic())
