"""Convert the official AKI checkpoint (`Sony/AKI-4B-phi-3.5-mini`) to the native format.

    python -m aki.convert_official --checkpoint DIR --out DIR [--vision-config PATH]
        [--text-config PATH] [--tokenizer DIR] [--dtype float32|bfloat16|float16]

The official folder holds `config.json` (the constructor's keyword arguments), `model.safetensors`
(fp32, ~17 GB) and tokenizer files. Tensors are streamed one at a time into shards, so memory
stays near one shard rather than twice the checkpoint. Every key of the native model must come
from the official file and every official key must be used (or be one the native model does not
need, listed in `UNUSED_OFFICIAL_PREFIXES`); otherwise the conversion stops and names the keys.

Key mapping (official -> native):
    vision_encoder.X                          -> model.vision_tower.X (SigLIP; its pooling head is unused)
    vision_tokenizer.latents                  -> model.connector.latents
    vision_tokenizer.layers.i.0.Y             -> model.connector.layers.i.attention.Y
    vision_tokenizer.layers.i.1.{0,1,3}       -> model.connector.layers.i.feed_forward.{norm,fc1,fc2}
    vision_tokenizer.{norm,projection}        -> model.connector.{norm,projection}
    lang_model.model.embed_tokens.weight[:n] + .additional_embedding.weight -> model.language_model.embed_tokens.weight
    lang_model.model.X                        -> model.language_model.X
    lang_model.lm_head.weight[:n] + lang_model.lm_head.additional_fc.weight  -> lm_head.weight
    lang_model.lm_head.bias[:n] + lang_model.lm_head.additional_fc.bias      -> lm_head.bias
where n = `initial_tokenizer_len` (32012): the official model reads ids < n from Phi's matrices
and the two added tokens (<image>, <|endofchunk|>) from the extra rows. The official head has a
bias although Phi-3.5's has none: its `DecoupledLinear` keeps `nn.Linear`'s default `bias=True`,
so the published checkpoint carries both biases and its logits include them. The native head gets
one (`AkiConfig.lm_head_bias`) exactly when the checkpoint holds `lang_model.lm_head.bias`.

`tests/test_convert_official.py` converts a folder written by the official code itself
(`tests/reference/make_official_golden.py`) and compares the logits and greedy tokens with that code's.
"""

import argparse
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoTokenizer, GenerationConfig

from .commands import add_debug_flag, run_command
from .configuration_aki import SIGLIP_SO400M_384, AkiConfig
from .modeling_aki import AkiForConditionalGeneration
from .presets import PHI35_MINI
from .processing_aki import PHI3_CHAT_TEMPLATE, AkiImageProcessor, AkiProcessor

logger = logging.getLogger("aki.convert_official")

# The tokens the official factory adds to Phi-3.5's 32011, in this order (docs/checkpoint.md).
OFFICIAL_ADDED_TOKENS = {"<pad>": 32011, "<image>": 32012, "<|endofchunk|>": 32013}
ASSISTANT_TOKEN = "<|assistant|>"
# Phi-3.5-mini-instruct's generation config ends a reply at any of these (ids 32007, 32001, 32000);
# the official `generate` runs with it.
STOP_TOKENS = ("<|end|>", "<|assistant|>", "<|endoftext|>")
OFFICIAL_HEAD_BIAS = "lang_model.lm_head.bias"
# Official tensors the native model does not need: SigLIP's attention-pooling head (AKI reads
# `last_hidden_state`) and rotary caches.
UNUSED_OFFICIAL_PREFIXES = ("vision_encoder.head.",)
UNUSED_OFFICIAL_SUFFIXES = (".inv_freq", ".position_ids")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConversionError(ValueError):
    """The official checkpoint does not match the native model; the message lists the keys."""


@dataclass(frozen=True)
class Source:
    """Where a native tensor comes from: one official tensor, or Phi's first rows plus added rows."""

    keys: tuple[str, ...]
    merge_rows: bool = False


def official_sources(native_key: str) -> Source:
    """The official tensor(s) a native key is read from."""
    if native_key.startswith("model.vision_tower."):
        return Source(("vision_encoder." + native_key.removeprefix("model.vision_tower."),))
    if native_key.startswith("model.connector."):
        rest = native_key.removeprefix("model.connector.")
        feed_forward = {"norm": "1.0", "fc1": "1.1", "fc2": "1.3"}
        if match := re.fullmatch(r"layers\.(\d+)\.attention\.(.+)", rest):
            rest = f"layers.{match[1]}.0.{match[2]}"
        elif match := re.fullmatch(r"layers\.(\d+)\.feed_forward\.(norm|fc1|fc2)\.(.+)", rest):
            rest = f"layers.{match[1]}.{feed_forward[match[2]]}.{match[3]}"
        return Source(("vision_tokenizer." + rest,))
    if native_key == "model.language_model.embed_tokens.weight":
        base = "lang_model.model.embed_tokens."
        return Source((base + "weight", base + "additional_embedding.weight"), merge_rows=True)
    if native_key.startswith("model.language_model."):
        return Source(("lang_model.model." + native_key.removeprefix("model.language_model."),))
    if native_key in ("lm_head.weight", "lm_head.bias"):
        name = native_key.removeprefix("lm_head.")
        return Source((f"lang_model.lm_head.{name}", f"lang_model.lm_head.additional_fc.{name}"), merge_rows=True)
    raise ConversionError(f"No official source is known for the native key {native_key!r}.")


class OfficialCheckpoint:
    """Lazy access to the official tensors: a single `model.safetensors` or an indexed set of shards."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (folder / "model.safetensors").exists():
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"No model.safetensors (or its index) in {folder}.")
        self._handles = [safe_open(str(folder / name), framework="pt") for name in files]
        self._where = {key: handle for handle in self._handles for key in handle.keys()}

    def keys(self) -> set[str]:
        return set(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._where[key].get_slice(key).get_shape())

    def tensor(self, key: str) -> torch.Tensor:
        return self._where[key].get_tensor(key)


def perceiver_shape(checkpoint: OfficialCheckpoint) -> dict:
    """The resampler's size, read from tensor shapes (the official config does not store it)."""
    keys = checkpoint.keys()
    depth = 1 + max(int(m[1]) for key in keys if (m := re.match(r"vision_tokenizer\.layers\.(\d+)\.", key)))
    inner = checkpoint.shape("vision_tokenizer.layers.0.0.to_q.weight")[0]
    width = checkpoint.shape("vision_tokenizer.latents")[1]
    head_dim = 64  # fixed in the official PerceiverAttention
    return {
        "perceiver_num_latents": checkpoint.shape("vision_tokenizer.latents")[0],
        "perceiver_depth": depth,
        "perceiver_heads": inner // head_dim,
        "perceiver_head_dim": head_dim,
        "perceiver_ff_mult": checkpoint.shape("vision_tokenizer.layers.0.1.1.weight")[0] // width,
    }


def build_config(
    official: dict, checkpoint: OfficialCheckpoint, vision_config: dict, text_config: dict, assistant_ids: list[int]
) -> AkiConfig:
    num_rows = official["initial_tokenizer_len"] + checkpoint.shape("lang_model.lm_head.additional_fc.weight")[0]
    vision = {"model_type": "siglip_vision_model", **vision_config, "vision_use_head": False}
    vision["image_size"] = official.get("n_px", vision.get("image_size"))
    text = {**text_config, "vocab_size": num_rows, "pad_token_id": official["pad_token_id"]}
    text.setdefault("model_type", "phi3")
    text.pop("architectures", None)
    text.pop("auto_map", None)
    shape = perceiver_shape(checkpoint)
    if shape["perceiver_num_latents"] != official.get("num_vision_tokens", shape["perceiver_num_latents"]):
        raise ConversionError("config.json num_vision_tokens disagrees with vision_tokenizer.latents.")
    return AkiConfig(
        vision_config=vision,
        text_config=text,
        connector_type="perceiver",
        image_token_id=OFFICIAL_ADDED_TOKENS["<image>"],
        assistant_marker_ids=assistant_ids,
        attention_policy="mma",
        lm_head_bias=OFFICIAL_HEAD_BIAS in checkpoint.keys(),
        **shape,
    )


def native_tensors(
    checkpoint: OfficialCheckpoint, expected: dict[str, torch.Size], num_original_rows: int, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """Check every key and shape first, then yield the native tensors one by one."""
    sources = {key: official_sources(key) for key in expected}
    needed = {official for source in sources.values() for official in source.keys}
    present = checkpoint.keys()
    missing = sorted(needed - present)
    unused = {k for k in present if k.startswith(UNUSED_OFFICIAL_PREFIXES) or k.endswith(UNUSED_OFFICIAL_SUFFIXES)}
    unexpected = sorted(present - needed - unused)
    if missing or unexpected:
        lines = [f"missing: {key}" for key in missing] + [f"unexpected: {key}" for key in unexpected]
        raise ConversionError("The official checkpoint does not match the model:\n  " + "\n  ".join(lines))

    wrong = []
    for key, source in sources.items():
        shapes = [checkpoint.shape(official) for official in source.keys]
        if source.merge_rows:
            first, extra = shapes
            shape = (min(first[0], num_original_rows) + extra[0], *first[1:])
            if first[0] < num_original_rows or first[1:] != extra[1:]:
                shape = None
        else:
            shape = shapes[0]
        if shape != tuple(expected[key]):
            wrong.append(f"{' + '.join(source.keys)}: {shapes} cannot give {key} of shape {tuple(expected[key])}")
    if wrong:
        raise ConversionError("Wrong shapes in the official checkpoint:\n  " + "\n  ".join(wrong))

    for key, source in sources.items():
        if source.merge_rows:
            first, extra = (checkpoint.tensor(official) for official in source.keys)
            tensor = torch.cat([first[:num_original_rows], extra], dim=0)
        else:
            tensor = checkpoint.tensor(source.keys[0])
        yield key, tensor.to(dtype).contiguous()


def write_shards(tensors: Iterator[tuple[str, torch.Tensor]], out: Path, total: int, max_shard_bytes: int) -> None:
    """Write safetensors shards as tensors arrive, holding at most one shard in memory, then name them
    as transformers expects: `model.safetensors`, or `model-0000i-of-0000n.safetensors` plus an index."""
    shard: dict[str, torch.Tensor] = {}
    written, shard_bytes, total_bytes = [], 0, 0
    for key, tensor in tqdm(tensors, total=total, desc="converting", unit="tensor"):
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            written.append(_save_shard(shard, out, len(written)))
            shard, shard_bytes = {}, 0
        shard[key] = tensor
        shard_bytes += size
        total_bytes += size
    written.append(_save_shard(shard, out, len(written)))
    if len(written) == 1:
        (out / written[0][0]).rename(out / "model.safetensors")
        return
    weight_map = {}
    for index, (name, keys) in enumerate(written, start=1):
        final = f"model-{index:05d}-of-{len(written):05d}.safetensors"
        (out / name).rename(out / final)
        weight_map.update(dict.fromkeys(keys, final))
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _save_shard(shard: dict[str, torch.Tensor], out: Path, number: int) -> tuple[str, list[str]]:
    name = f"shard-{number:05d}.safetensors.tmp"
    save_file(shard, str(out / name), metadata={"format": "pt"})
    return name, list(shard)


def convert_tokenizer(folder: Path):
    """The official tokenizer with AKI's added tokens at their official ids, BOS on, EOS off."""
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    missing = [token for token in OFFICIAL_ADDED_TOKENS if token not in tokenizer.get_vocab()]
    if "<pad>" in missing:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    extra = [token for token in ("<image>", "<|endofchunk|>") if token in missing]
    if extra:
        tokenizer.add_special_tokens({"additional_special_tokens": extra}, replace_extra_special_tokens=False)
    tokenizer.pad_token = "<pad>"
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in OFFICIAL_ADDED_TOKENS}
    if ids != OFFICIAL_ADDED_TOKENS:
        raise ConversionError(f"The tokenizer gives the added tokens the ids {ids}; expected {OFFICIAL_ADDED_TOKENS}.")
    # The official factory turned on add_eos_token for training; prompts must not end in EOS.
    if getattr(tokenizer, "add_eos_token", False):
        tokenizer.add_eos_token = False
    return tokenizer


def convert(
    checkpoint: Path,
    out: Path,
    vision_config: Path | None = None,
    text_config: Path | None = None,
    tokenizer: Path | None = None,
    dtype: str = "float32",
    max_shard_size_gb: float = 5.0,
) -> AkiConfig:
    """Convert an official folder to a native one; returns the native config."""
    checkpoint, out = Path(checkpoint), Path(out)
    official = json.loads((checkpoint / "config.json").read_text())
    vision = json.loads(Path(vision_config).read_text()) if vision_config else dict(SIGLIP_SO400M_384)
    text = json.loads(Path(text_config).read_text()) if text_config else dict(PHI35_MINI)
    processor_tokenizer = convert_tokenizer(Path(tokenizer) if tokenizer else checkpoint)
    assistant_ids = processor_tokenizer.encode(ASSISTANT_TOKEN, add_special_tokens=False)

    weights = OfficialCheckpoint(checkpoint)
    config = build_config(official, weights, vision, text, assistant_ids)
    config.dtype = dtype
    with torch.device("meta"):
        expected = {key: value.shape for key, value in AkiForConditionalGeneration(config).state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    logger.info("converting %d tensors from %s to %s (%s)", len(expected), checkpoint, out, dtype)
    tensors = native_tensors(weights, expected, official["initial_tokenizer_len"], DTYPES[dtype])
    write_shards(tensors, out, len(expected), int(max_shard_size_gb * 2**30))

    config.save_pretrained(out)
    GenerationConfig(
        bos_token_id=processor_tokenizer.bos_token_id,
        eos_token_id=processor_tokenizer.convert_tokens_to_ids(list(STOP_TOKENS)),
        pad_token_id=OFFICIAL_ADDED_TOKENS["<pad>"],
        do_sample=False,
    ).save_pretrained(out)
    image_size = config.vision_config.image_size
    # The official demo reads the image normalisation from config.json (0.5 when absent).
    mean, std = official.get("norm_mean", 0.5), official.get("norm_std", 0.5)
    image_processor = AkiImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=[mean] * 3, image_std=[std] * 3
    )
    AkiProcessor(
        image_processor=image_processor,
        tokenizer=processor_tokenizer,
        num_image_tokens=config.num_image_tokens,
        chat_template=PHI3_CHAT_TEMPLATE,
    ).save_pretrained(out)
    logger.info("wrote %s", out)
    return config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert an official AKI checkpoint to the native format.")
    parser.add_argument(
        "--checkpoint", type=Path, required=True, help="official folder (config.json, model.safetensors)"
    )
    parser.add_argument("--out", type=Path, required=True, help="where to write the native checkpoint")
    parser.add_argument("--vision-config", type=Path, help="SigLIP vision config JSON (default: so400m-patch14-384)")
    parser.add_argument("--text-config", type=Path, help="language model config.json (default: Phi-3.5-mini-instruct)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: the checkpoint folder)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--max-shard-size-gb", type=float, default=5.0)
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_command(
        lambda: convert(
            args.checkpoint,
            args.out,
            args.vision_config,
            args.text_config,
            args.tokenizer,
            args.dtype,
            args.max_shard_size_gb,
        ),
        args.debug,
    )


if __name__ == "__main__":
    main()
