"""Inference engines behind the Engine protocol: they sample groups on a given policy version and stream trajectories back.

`ENGINES` maps a config name to an engine class (`ENGINES.get("torch")`); an import path also works.
"""

from dora.registry import Registry

ENGINES: Registry = Registry("engine")

from dora.engines import torch_engine  # noqa: E402,F401  (registers "torch")
from dora.engines import vllm_engine  # noqa: E402,F401  (registers "vllm"; imports vLLM only when built)
