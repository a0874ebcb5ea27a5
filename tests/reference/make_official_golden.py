"""Write a tiny checkpoint with the official AKI code, and the outputs of that code, for the golden test.

Runs in a scratch environment with the official pins, never in the project's (see README.md beside
this file):

    python tests/reference/make_official_golden.py --official-src /path/to/sony-aki --out tests/reference/official_golden

`--official-src` is a checkout of github.com/sony/aki; its `AKI` class (`codes/open_flamingo/src/
modeling_aki.py`, the one the published AKI-4B folder loads into) builds the model, saves it and
computes every recorded output. Nothing of it is copied here.

The model is AKI-4B's layout at toy width: a tiny SigLIP, the official Perceiver (its class fixes
6 layers of 8 heads x 64), a tiny Phi-3 with Phi-3.5's vocabulary of 32064 rows, the decoupled
embedding and head with `initial_tokenizer_len` 32012 and two added tokens, and the tokenizer with
Phi-3.5's special-token ids. Every parameter is redrawn from a seeded normal so that nothing sits
at a default a bug could hide behind (the head's bias, LayerNorm affines, the latents).

Written under --out:
    checkpoint/               what the official code saves: config.json, model.safetensors, tokenizer
    siglip_vision_config.json the tiny vision tower's config (the role of SigLIP-so400m's)
    phi3_config.json          the tiny Phi-3's config, as Phi-3.5-mini's config.json spells it
    outputs.safetensors       inputs, logits and SFT loss of the official forward, greedy tokens of its generate
    outputs.json              texts, which logit columns are kept, versions

Logits are (rows, 32014) per sequence, too large to commit in full: `outputs.safetensors` keeps, for
every row, the columns in `outputs.json["logit_columns"]` (every 211th id and the last 64 ids: Phi's
chat tokens, <pad>, <image>, <|endofchunk|>) and, over all 32014 columns, the logsumexp, the max
and the argmax.

Shape legend: b batch, s sequence (after image expansion), c kept columns.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from phi_tokenizer import phi_like_tokenizer  # noqa: E402

SEED = 0
NUM_VISION_TOKENS = 4
INITIAL_TOKENIZER_LEN = 32012  # Phi-3.5's 32011 tokens plus <pad>, as the official factory counts them
PAD_ID = 32011
ASSISTANT_ID = 32001
# Phi-3.5-mini-instruct's generation_config.json: <|end|>, <|assistant|>, <|endoftext|> end a turn.
PHI35_GENERATION = {"bos_token_id": 1, "eos_token_id": [32007, 32001, 32000], "pad_token_id": 32000}
MAX_NEW_TOKENS = 24
IMAGE_SIZE = 32

SIGLIP_VISION = {
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": IMAGE_SIZE,
    "patch_size": 8,
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu_pytorch_tanh",
}
SIGLIP_TEXT = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1,
               "num_attention_heads": 2, "max_position_embeddings": 16}  # fmt: skip
PHI3 = {
    "vocab_size": 32064,
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "original_max_position_embeddings": 512,
    "rope_theta": 10000.0,
    # Phi-3.5's LongRoPE at toy size (transformers 4.41.2 names it "su"; Phi-3.5's config.json "longrope").
    "rope_scaling": {"type": "su", "short_factor": [1.0, 1.5], "long_factor": [2.0, 4.0]},
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 32000,
    "pad_token_id": 32000,
    "tie_word_embeddings": False,
}

SYSTEM = (
    "<|system|>\nA chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions.<|end|>\n"
)
# The official SFT layout (train/sft_data_utils: system, user turn with <image>, assistant turn; the
# tokenizer adds BOS and the EOS <|endoftext|>), the pre-training caption layout (train/data.py) and
# the demo's generation prompt. BOS comes from the tokenizer.
SFT = [
    SYSTEM + "<|user|>\n<image>\nWhat is in the image?<|end|>\n<|assistant|>\nA red square.<|endoftext|>",
    SYSTEM + "<|user|>\n<image>\nIs it round?<|end|>\n<|assistant|>\nNo.<|endoftext|>",
]
CAPTION = "<image>A red square on a white table.<|endofchunk|><|endoftext|>"
PROMPT = SYSTEM + "<|user|>\n<image>\nDescribe the image.<|end|>\n<|assistant|>\n"


def logit_columns(num_columns: int) -> torch.Tensor:
    """Every 211th id, and the last 64 ids (Phi's chat tokens and the added ones)."""
    return torch.unique(torch.cat([torch.arange(0, num_columns, 211), torch.arange(num_columns - 64, num_columns)]))


def summarize(logits: torch.Tensor, columns: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    """logits (b, s, V) -> kept columns (b, s, c) and full-vocabulary statistics (b, s)."""
    best = logits.max(-1)
    return {
        f"{prefix}.logits": logits[..., columns].contiguous(),
        f"{prefix}.logsumexp": logits.logsumexp(-1).contiguous(),
        f"{prefix}.max": best.values.contiguous(),
        f"{prefix}.argmax": best.indices.contiguous(),
    }


def build_tokenizer():
    """Phi-3.5's special-token ids, then the tokens the official factory adds, in its order."""
    tokenizer = phi_like_tokenizer()
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<|endofchunk|>"]})
    ids = tokenizer.convert_tokens_to_ids(["<pad>", "<image>", "<|endofchunk|>"])
    assert ids == [32011, 32012, 32013], ids
    return tokenizer


def save_backbones(folder: Path) -> tuple[Path, Path]:
    """Random tiny SigLIP and Phi-3 folders, which the official class loads by path."""
    from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM, SiglipConfig, SiglipModel

    siglip, phi3 = folder / "siglip", folder / "phi3"
    SiglipModel(SiglipConfig(text_config=SIGLIP_TEXT, vision_config=SIGLIP_VISION)).save_pretrained(siglip)
    Phi3ForCausalLM(Phi3Config(**PHI3)).save_pretrained(phi3)
    GenerationConfig(**PHI35_GENERATION).save_pretrained(phi3)
    return siglip, phi3


@torch.no_grad()
def redraw(model: torch.nn.Module, seed: int) -> None:
    """Every parameter from a seeded normal: matrices ~ N(0, 1/fan_in), norm weights ~ 1 + N(0, 0.1),
    biases ~ N(0, 0.1), the latents ~ N(0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in sorted(model.named_parameters()):
        noise = torch.randn(parameter.shape, generator=generator)
        if name.endswith("latents"):
            parameter.copy_(noise)
        elif parameter.ndim >= 2:
            parameter.copy_(noise / parameter[0].numel() ** 0.5)
        elif name.endswith("weight"):
            parameter.copy_(1 + 0.1 * noise)
        else:
            parameter.copy_(0.1 * noise)


def official_commit(source: Path, given: str | None) -> str:
    if given:
        return given
    result = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official-src", type=Path, required=True, help="a checkout of github.com/sony/aki")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--official-commit", help="the checkout's commit, when it is not a git work tree")
    args = parser.parse_args()

    sys.path.insert(0, str(args.official_src / "codes" / "open_flamingo"))
    import transformers
    from src.aki_generation import _aki_update_model_kwargs_for_generation
    from src.modeling_aki import AKI
    from transformers.generation.utils import GenerationMixin

    # As the official demo and evaluation do before generating: their 4D MMA mask needs this update rule.
    GenerationMixin._update_model_kwargs_for_generation = _aki_update_model_kwargs_for_generation

    out, checkpoint = args.out, args.out / "checkpoint"
    checkpoint.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    with tempfile.TemporaryDirectory() as scratch:
        siglip, phi3 = save_backbones(Path(scratch))
        paths = {"vision_encoder_path": str(siglip), "lang_model_path": str(phi3)}
        kwargs = {"pad_token_id": PAD_ID, "initial_tokenizer_len": INITIAL_TOKENIZER_LEN}
        # The decoder-layer path is what the official factory infers for Phi ("model.layers"); the class
        # cannot be built without it, so the published config.json holds it too.
        kwargs |= {"num_vision_tokens": NUM_VISION_TOKENS, "decoder_layers_attr_name": "model.layers"}
        torch.manual_seed(SEED)
        model = AKI(**paths, **kwargs, tokenizer=tokenizer)
        redraw(model, SEED)
        # The published config.json names the hub backbones and the image transform.
        published = {"vision_encoder_path": "google/siglip-so400m-patch14-384",
                     "lang_model_path": "microsoft/Phi-3.5-mini-instruct", **kwargs,
                     "n_px": IMAGE_SIZE, "norm_mean": 0.5, "norm_std": 0.5}  # fmt: skip
        model.save_pretrained(checkpoint, config=published)
        tokenizer.save_pretrained(checkpoint)
        (checkpoint / "README.md").unlink()  # the hub mixin's empty model-card stub

        # The outputs come from the saved folder, loaded as the official demo loads AKI-4B.
        official = AKI.from_pretrained(checkpoint, tokenizer=tokenizer, **paths).eval()
        saved = load_file(str(checkpoint / "model.safetensors"))
        loaded = official.state_dict()
        assert saved.keys() == loaded.keys(), sorted(saved.keys() ^ loaded.keys())
        assert all(torch.equal(saved[key], loaded[key]) for key in saved)
        eos_token_id = official.lang_model.generation_config.eos_token_id
        attention = official.lang_model.config._attn_implementation

        vision = official.vision_encoder.config.to_dict()
        text = official.lang_model.config.to_dict()
    text = {**{k: v for k, v in text.items() if k in PHI3}, "model_type": "phi3"}
    text["vocab_size"] = PHI3["vocab_size"]  # the official class sets the config to len(tokenizer)
    text["rope_scaling"] = {**PHI3["rope_scaling"], "type": "longrope"}
    (out / "phi3_config.json").write_text(json.dumps(text, indent=2) + "\n")
    vision = {"model_type": "siglip_vision_model", **{k: v for k, v in vision.items() if k in SIGLIP_VISION}}
    (out / "siglip_vision_config.json").write_text(json.dumps(vision, indent=2) + "\n")

    generator = torch.Generator().manual_seed(SEED)
    pixel_values = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 2 - 1
    columns = logit_columns(INITIAL_TOKENIZER_LEN + 2)
    tokenizer.padding_side = "right"
    tensors = {"pixel_values": pixel_values, "logit_columns": columns}
    with torch.no_grad():
        for name, texts, images in (("sft", SFT, pixel_values), ("caption", [CAPTION], pixel_values[:1])):
            encoded = tokenizer(texts, padding=True, return_tensors="pt")
            # vision_x (b, T_img=1, F=1, 3, H, W): one image per sample.
            logits = official(
                vision_x=images[:, None, None], lang_x=encoded.input_ids, attention_mask=encoded.attention_mask
            ).logits
            tensors |= {f"{name}.input_ids": encoded.input_ids, f"{name}.attention_mask": encoded.attention_mask}
            tensors |= summarize(logits, columns, name)
        # The SFT loss, with the official labels: nothing up to and including the first <|assistant|>
        # (train/sft_data_utils/base.py), no padding; the official forward masks the image tokens itself.
        encoded = tokenizer(SFT, padding=True, return_tensors="pt")
        labels = encoded.input_ids.masked_fill(encoded.attention_mask == 0, -100)
        for row in labels:
            row[: int((row == ASSISTANT_ID).nonzero()[0]) + 1] = -100
        loss = official(
            vision_x=pixel_values[:, None, None],
            lang_x=encoded.input_ids,
            attention_mask=encoded.attention_mask,
            labels=labels,
        ).loss
        tensors |= {"sft.labels": labels, "sft.loss": loss}
        encoded = tokenizer([PROMPT], return_tensors="pt")
        generated = official.generate(
            vision_x=pixel_values[:1, None, None],
            lang_x=encoded.input_ids,
            attention_mask=encoded.attention_mask,
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
        )
        logits = official(
            vision_x=pixel_values[:1, None, None], lang_x=encoded.input_ids, attention_mask=encoded.attention_mask
        ).logits
        tensors |= {"generate.input_ids": encoded.input_ids, "generate.tokens": generated}
        tensors |= summarize(logits, columns, "generate")
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(out / "outputs.safetensors"))

    record = {
        "official_repository": "https://github.com/sony/aki",
        "official_commit": official_commit(args.official_src, args.official_commit),
        "official_class": "codes/open_flamingo/src/modeling_aki.py:AKI",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "seed": SEED,
        "texts": {"sft": SFT, "caption": [CAPTION], "generate": [PROMPT]},
        "num_vision_tokens": NUM_VISION_TOKENS,
        "max_new_tokens": MAX_NEW_TOKENS,
        "eos_token_id": eos_token_id,
        "lang_model_attention": attention,
        "logit_columns": "every 211th id and the last 64 ids of the 32014",
    }
    (out / "outputs.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}: greedy tokens {generated.tolist()}")


if __name__ == "__main__":
    main()
