"""Byte layout of a published state dict: where each named tensor lives in one flat buffer.

Every channel moves a policy version as one flat byte buffer (a shared-memory slot, a run of
broadcast buckets, one object-store blob) plus a `WeightLayout` that says, per tensor, its name,
dtype, shape and byte offset. The layout is fixed for a model (same names, shapes and dtypes every
version), so it is computed once, sent once where the channel allows, and checked on every publish.

Offsets are aligned to `ALIGN` bytes so that a slice of the flat uint8 buffer can be viewed as any
dtype without a copy (`Tensor.view(dtype)` needs the byte offset divisible by the element size).

Shape legend: N = total bytes of the flat buffer.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

ALIGN = 64
"""Byte alignment of every tensor in the flat buffer (a cache line; >= any dtype's size)."""

COPY_CHUNK_BYTES = 16 << 20
"""Large copies are issued in chunks of this size: a receive is then a series of short GIL-free
torch calls (copy_ releases the GIL), and the Python work of a decode loop in another thread
interleaves with it at that granularity."""

_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16,
        torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
        torch.complex64, torch.complex128, torch.float8_e4m3fn, torch.float8_e5m2,
    )
}


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise TypeError(f"dtype {dtype} cannot be synced; supported: {sorted(_DTYPES)}")
    return name


def dtype_from_name(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r} in a weight layout; supported: {sorted(_DTYPES)}")
    return _DTYPES[name]


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(slots=True, frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    """Byte offset in the flat buffer (a multiple of ALIGN)."""
    nbytes: int


@dataclass(slots=True, frozen=True)
class WeightLayout:
    specs: tuple[TensorSpec, ...]
    nbytes: int
    """Size of the flat buffer (aligned end of the last tensor)."""

    @staticmethod
    def of(weights: Mapping[str, torch.Tensor]) -> WeightLayout:
        specs: list[TensorSpec] = []
        offset = 0
        for name, tensor in weights.items():
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"weight {name!r} must be a torch.Tensor, got {type(tensor).__name__}")
            nbytes = tensor.numel() * tensor.element_size()
            specs.append(TensorSpec(name, tensor.dtype, tuple(tensor.shape), offset, nbytes))
            dtype_name(tensor.dtype)  # rejects dtypes a layout cannot name
            offset = _align(offset + nbytes)
        return WeightLayout(tuple(specs), max(offset, ALIGN))

    def check(self, weights: Mapping[str, torch.Tensor], channel: str) -> None:
        """A ValueError naming the first tensor that does not match this layout."""
        if len(weights) != len(self.specs) or any(s.name not in weights for s in self.specs):
            missing = [s.name for s in self.specs if s.name not in weights]
            extra = sorted(set(weights) - {s.name for s in self.specs})
            raise ValueError(f"{channel}: published weights do not match the channel's layout "
                             f"(missing {missing[:5]}, unexpected {extra[:5]}); the layout is fixed "
                             "by the first publish")
        for spec in self.specs:
            tensor = weights[spec.name]
            if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
                raise ValueError(f"{channel}: weight {spec.name!r} is {tensor.dtype} {tuple(tensor.shape)}, "
                                 f"the channel's layout expects {spec.dtype} {spec.shape}")

    def to_json(self) -> str:
        return json.dumps({
            "nbytes": self.nbytes,
            "tensors": [[s.name, dtype_name(s.dtype), list(s.shape), s.offset, s.nbytes] for s in self.specs],
        })

    @staticmethod
    def from_json(text: str) -> WeightLayout:
        obj = json.loads(text)
        specs = tuple(TensorSpec(name, dtype_from_name(dt), tuple(shape), offset, nbytes)
                      for name, dt, shape, offset, nbytes in obj["tensors"])
        return WeightLayout(specs, obj["nbytes"])

    def pack(self, weights: Mapping[str, torch.Tensor], flat_N: torch.Tensor) -> None:
        """Copy every tensor's bytes into its place in `flat_N` (uint8, any device)."""
        for spec in self.specs:
            if spec.nbytes:
                copy_chunked(flat_N[spec.offset:spec.offset + spec.nbytes], as_bytes(weights[spec.name]))

    def pack_range(self, weight_bytes: Mapping[str, torch.Tensor], start: int, end: int, out: torch.Tensor) -> None:
        """Copy bytes [start, end) of the flat buffer into `out` (a uint8 bucket of end - start bytes)
        from `weight_bytes` (each tensor's `as_bytes`). Alignment padding is left untouched."""
        for spec in self.specs:
            lo, hi = max(start, spec.offset), min(end, spec.offset + spec.nbytes)
            if lo < hi:
                src = weight_bytes[spec.name][lo - spec.offset:hi - spec.offset]
                copy_chunked(out[lo - start:hi - start], src)

    def views(self, flat_N: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tensors that alias `flat_N` (no copy): valid as long as `flat_N`'s memory is."""
        out: dict[str, torch.Tensor] = {}
        for spec in self.specs:
            raw = flat_N[spec.offset:spec.offset + spec.nbytes]
            out[spec.name] = raw.view(spec.dtype).view(spec.shape)
        return out

    def buckets(self, bucket_bytes: int) -> Iterator[tuple[int, int]]:
        """[start, end) byte ranges of the flat buffer, each at most `bucket_bytes` (ALIGN-rounded)."""
        step = max(ALIGN, bucket_bytes // ALIGN * ALIGN)
        for start in range(0, self.nbytes, step):
            yield start, min(start + step, self.nbytes)


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 tensor (a view when it is contiguous)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def copy_chunked(dst: torch.Tensor, src: torch.Tensor, chunk_bytes: int = COPY_CHUNK_BYTES) -> None:
    """`dst.copy_(src)` for flat uint8 tensors, in chunks so other Python threads interleave."""
    n = src.numel()
    if n <= chunk_bytes:
        dst.copy_(src)
        return
    for start in range(0, n, chunk_bytes):
        dst[start:start + chunk_bytes].copy_(src[start:start + chunk_bytes])


def checksum(flat: torch.Tensor) -> int:
    """CRC-32 of a flat uint8 tensor's bytes (CPU); on an accelerator, an int64 sum of its int32
    words (cheap, catches torn or misplaced buckets, not every bit flip)."""
    if flat.device.type == "cpu":
        return zlib.crc32(flat.numpy().data) if flat.numel() else 0
    words = flat.view(torch.int32) if flat.numel() % 4 == 0 else flat
    return int(words.sum(dtype=torch.int64).item())
