"""`dora-train RECIPE [overrides...]`: run a recipe from `recipes/` with Hydra overrides.

    dora-train grpo_tiny
    dora-train grpo_tiny rollout.max_staleness=1 steps=50 trainer.lr=0
    dora-train grpo_tiny --cfg job          # print the composed config and exit

The recipe name becomes the Hydra override `+recipes=NAME` (recipes are `# @package _global_`
files that override `conf/` groups); everything else is passed to Hydra as is. The composed config
is converted to typed objects before anything is built, so a wrong key, type or value fails at
start naming the key.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from dora.config import RunConfig, to_run_config
from dora.runtime.components import REPO_ROOT

CONF_DIR = REPO_ROOT / "conf"
RECIPES_DIR = REPO_ROOT / "recipes"
_SEARCHPATH = f"hydra.searchpath=[file://{REPO_ROOT}]"


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def _recipe_override(name: str) -> str:
    if name not in recipe_names():
        raise SystemExit(f"dora-train: unknown recipe {name!r}; available: {', '.join(recipe_names())}")
    return f"+recipes={name}"


def compose_config(recipe: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The typed config of `recipe` with `overrides`, composed exactly as `dora-train` does
    (for tests, benchmarks and notebooks)."""
    args = ([_recipe_override(recipe)] if recipe else []) + list(overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=[*args, _SEARCHPATH])
    return to_run_config(cfg)


def run(cfg: RunConfig, run_dir: Path):
    if cfg.runtime.kind.value == "ray":
        from dora.runtime.ray_runtime import train_ray

        return train_ray(cfg, run_dir)
    if cfg.runtime.kind.value == "local":
        from dora.runtime.local import train_local

        return train_local(cfg, run_dir)
    from dora.runtime.inline import train_inline

    return train_inline(cfg, run_dir)


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def _hydra_main(dict_cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = to_run_config(dict_cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    (run_dir / "resolved_config.yaml").write_text(OmegaConf.to_yaml(dict_cfg, resolve=True))
    run(cfg, run_dir)


def main() -> None:
    args = sys.argv[1:]
    if args and not args[0].startswith("-") and "=" not in args[0]:
        args[0] = _recipe_override(args[0])
    # First: Hydra's parser takes the overrides as one run of positionals, so one appended after
    # `--cfg job` would be rejected.
    sys.argv = [sys.argv[0], _SEARCHPATH, *args]
    try:
        _hydra_main()
    except ValueError as e:  # config errors: one clear line, no traceback
        raise SystemExit(f"dora-train: {e}") from None


if __name__ == "__main__":
    main()
