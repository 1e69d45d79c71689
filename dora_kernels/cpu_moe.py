"""The fused CPU MoE experts kernel (`dora_kernels/cpu/moe_experts.cpp`), built with torch's C++ extension
tooling on first use and cached by torch (`TORCH_EXTENSIONS_DIR`, default ~/.cache/torch_extensions).

    python -m dora_kernels.cpu_moe          # build now (make setup does; ~25 s with gcc, once)

`load()` returns the compiled module, or None with the reason in `load_error()` when this machine
cannot build it (no C++ compiler, no ninja): callers fall back to the pure-torch experts
(`dora.engines.experts`, impl "grouped"). The torch reference and the parity tests live in
dora/engines/experts.py and tests/engines/test_torch_experts.py.

moe_experts(x [N, D], ids [N, K] int64, weights [N, K], gate_up [E, D, 2I], down [E, I, D]) -> [N, D]:
inference only (refuses tensors that require grad), float32 / bfloat16 / float16.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from types import ModuleType

SOURCE = Path(__file__).resolve().parent / "cpu" / "moe_experts.cpp"
_lock = threading.Lock()
_tried = False
_module: ModuleType | None = None
_error: str | None = None


def load() -> ModuleType | None:
    """The compiled kernel module, building it on first call in this environment; None if it cannot be
    built. After the first call this is a read of a global (it sits on the decode step's path)."""
    global _tried, _module, _error
    if _tried:
        return _module
    with _lock:  # engines may be built from several threads; torch's own file lock covers processes
        if not _tried:
            try:
                from torch.utils.cpp_extension import load as load_extension

                _module = load_extension(name="dora_moe_cpu", sources=[str(SOURCE)], extra_cflags=["-O3"],
                                         verbose=False)
            except Exception as e:  # no compiler / ninja, or a failed build: the torch path serves instead
                _error = f"{type(e).__name__}: {e}".strip()
            _tried = True
    return _module


def load_error() -> str | None:
    """Why `load()` returned None (None when it has not failed)."""
    return _error


def main() -> int:
    module = load()
    if module is None:
        print(f"dora_kernels.cpu_moe: not built, the engine uses its torch experts ({load_error()})", file=sys.stderr)
        return 0  # optional: setup must not fail on a machine without a compiler
    print(f"dora_kernels.cpu_moe: built ({module.__file__})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
