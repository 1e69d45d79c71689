"""Hot kernels for dora.

Each kernel ships with a pure-torch reference, a fast path chosen automatically and a parity test.
The torch references live next to their callers:
- `cpu_moe`: fused dropless MoE experts for CPU inference (C++, `cpu/moe_experts.cpp`), the torch
  engine's default on CPU; reference `dora.engines.experts` / `dora.models.ops.moe_experts`, parity in
  tests/engines/test_torch_experts.py.
"""
