"""Runs inside vLLM's engine process: the worker extension that loads a new policy version.

vLLM mixes `DoraWorkerExtension` into its worker class (`worker_extension_cls`); the dora engine calls
its methods with `collective_rpc`. Tensors cross the process boundary as safetensors bucket files in
shared memory (/dev/shm): `collective_rpc` carries only their paths (a pickled tensor crosses it only
in-process, and pickling hundreds of MB through its socket costs several copies), and the worker reads
each tensor straight from the memory-mapped file while loading it:

    dora_begin_update()  ->  dora_load_bucket(path) x N  ->  dora_finish_update(names)

Loading goes through vLLM's own in-place reload (`Worker.reload_weights`: layerwise, each layer's
checkpoint-format weights through the model's `load_weights`, then the layer's processing). On CPU it
then prepacks each MoE layer's experts again (see `_dora_rebuild_moe_kernels`): without that step the
CPU grouped GEMM reads unpacked weights as packed ones and MoE outputs are wrong. Nothing is loaded
before `dora_finish_update` has checked the names of every bucket, so a malformed update fails before
any weight changes and the engine keeps serving the previous version.

This module imports nothing from vLLM at import time: it must load in any process where vLLM imports
it by name.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["DoraWorkerExtension"]


class DoraWorkerExtension:
    """Methods added to vLLM's worker (`self` is the worker: `self.model_runner`, `self.reload_weights`)."""

    _dora_pending: list[str]

    def dora_begin_update(self) -> None:
        self._dora_pending = []

    def dora_load_bucket(self, path: str) -> None:
        """Register one safetensors bucket file (Hugging Face checkpoint names)."""
        self._dora_pending.append(path)

    def dora_finish_update(self, expected_names: list[str]) -> dict[str, Any]:
        """Load every registered bucket into the live model. `expected_names` is the full list the
        sender meant to send (it checked them against the model's config): a missing or extra name is
        an error before anything is loaded."""
        from safetensors import safe_open

        paths, self._dora_pending = getattr(self, "_dora_pending", []), []
        received = []
        for path in paths:
            with safe_open(path, "pt") as f:
                received.extend(f.keys())
        missing = sorted(set(expected_names) - set(received))
        extra = sorted(set(received) - set(expected_names))
        if missing or extra or len(received) != len(set(received)):
            raise ValueError(f"weight update incomplete or inconsistent: missing {missing[:5]}, unexpected "
                             f"{extra[:5]}, {len(received) - len(set(received))} duplicated")

        def weights() -> Iterator[tuple[str, torch.Tensor]]:
            for path in paths:
                with safe_open(path, "pt") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name)

        self.reload_weights(weights_iterator=weights(), is_checkpoint_format=True)
        rebuilt = self._dora_rebuild_moe_kernels()
        return {"tensors": len(received), "moe_layers_rebuilt": rebuilt}

    def _dora_rebuild_moe_kernels(self) -> int:
        """vLLM's reload re-runs each MoE layer's processing as a weight update, which skips the experts
        kernel's own step; on CPU that step prepacks the experts for the grouped GEMM, so it is re-run
        here on the freshly loaded (unpacked) weights. Elsewhere that step is a no-op or done by the reload."""
        from vllm.model_executor.layers.fused_moe import FusedMoEMethodBase
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return 0
        rebuilt = 0
        for module in self.model_runner.get_model().modules():
            method = getattr(module, "quant_method", None)
            kernel = getattr(method, "moe_kernel", None)
            if isinstance(method, FusedMoEMethodBase) and kernel is not None:
                kernel.fused_experts.process_weights_after_loading(module)
                rebuilt += 1
        return rebuilt
