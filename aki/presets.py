"""Named model shapes as plain data, and builders for the tiny ones.

`PRESETS[name]` holds the keyword arguments of `AkiConfig`. The assistant header is stored as
text (`assistant_header`) for presets whose tokenizer is built here, and as ids
(`assistant_marker_ids`) for the real checkpoints, whose tokenizers a user brings.
"""

import copy

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from .configuration_aki import SIGLIP_SO400M_384, AkiConfig
from .processing_aki import (
    AKI_SYSTEM_PROMPT,
    LLAMA3_CHAT_TEMPLATE,
    PHI3_CHAT_TEMPLATE,
    AkiImageProcessor,
    AkiProcessor,
)

# Phi-3.5-mini-instruct (config.json of microsoft/Phi-3.5-mini-instruct), vocabulary cut to the
# 32014 ids AKI uses: Phi's 32011 tokens, <pad> 32011, <image> 32012, <|endofchunk|> 32013.
PHI35_MINI = {
    "model_type": "phi3",
    "vocab_size": 32014,
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "original_max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": {
        "type": "longrope",
        "long_factor": [
            1.0800000429153442,
            1.1100000143051147,
            1.1399999856948853,
            1.340000033378601,
            1.5899999141693115,
            1.600000023841858,
            1.6200000047683716,
            2.620000123977661,
            3.2300000190734863,
            3.2300000190734863,
            4.789999961853027,
            7.400000095367432,
            7.700000286102295,
            9.09000015258789,
            12.199999809265137,
            17.670000076293945,
            24.46000099182129,
            28.57000160217285,
            30.420001983642578,
            30.840002059936523,
            32.590003967285156,
            32.93000411987305,
            42.320003509521484,
            44.96000289916992,
            50.340003967285156,
            50.45000457763672,
            57.55000305175781,
            57.93000411987305,
            58.21000289916992,
            60.1400032043457,
            62.61000442504883,
            62.62000274658203,
            62.71000289916992,
            63.1400032043457,
            63.1400032043457,
            63.77000427246094,
            63.93000411987305,
            63.96000289916992,
            63.970001220703125,
            64.02999877929688,
            64.06999969482422,
            64.08000183105469,
            64.12000274658203,
            64.41000366210938,
            64.4800033569336,
            64.51000213623047,
            64.52999877929688,
            64.83999633789062,
        ],
        "short_factor": [
            1.0,
            1.0199999809265137,
            1.0299999713897705,
            1.0299999713897705,
            1.0499999523162842,
            1.0499999523162842,
            1.0499999523162842,
            1.0499999523162842,
            1.0499999523162842,
            1.0699999332427979,
            1.0999999046325684,
            1.1099998950958252,
            1.1599998474121094,
            1.1599998474121094,
            1.1699998378753662,
            1.2899998426437378,
            1.339999794960022,
            1.679999828338623,
            1.7899998426437378,
            1.8199998140335083,
            1.8499997854232788,
            1.8799997568130493,
            1.9099997282028198,
            1.9399996995925903,
            1.9899996519088745,
            2.0199997425079346,
            2.0199997425079346,
            2.0199997425079346,
            2.0199997425079346,
            2.0199997425079346,
            2.0199997425079346,
            2.0299997329711914,
            2.0299997329711914,
            2.0299997329711914,
            2.0299997329711914,
            2.0299997329711914,
            2.0299997329711914,
            2.0299997329711914,
            2.0299997329711914,
            2.0299997329711914,
            2.0799996852874756,
            2.0899996757507324,
            2.189999580383301,
            2.2199995517730713,
            2.5899994373321533,
            2.729999542236328,
            2.749999523162842,
            2.8399994373321533,
        ],
    },
    "sliding_window": 262144,
    "bos_token_id": 1,
    "eos_token_id": 32000,
    "pad_token_id": 32011,
    "tie_word_embeddings": False,
}

# Llama-3.2-3B-Instruct, one of the paper's backbones, with <image> appended as id 128256.
LLAMA32_3B = {
    "model_type": "llama",
    "vocab_size": 128257,
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 28,
    "num_attention_heads": 24,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "bos_token_id": 128000,
    "eos_token_id": 128009,
    "tie_word_embeddings": True,
}

TINY_VISION = {
    "model_type": "siglip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
    "vision_use_head": False,
}
TINY_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "vocab_size": 512,
    "tie_word_embeddings": False,
}
TINY_PERCEIVER = {
    "perceiver_num_latents": 8,
    "perceiver_depth": 2,
    "perceiver_heads": 2,
    "perceiver_head_dim": 16,
    "perceiver_ff_mult": 2,
}

# The tiny tokenizer's special tokens take ids 0.. in this order.
TINY_SPECIAL_TOKENS = [
    "<s>", "<|endoftext|>", "<pad>", "<image>", "<|endofchunk|>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
]  # fmt: skip
TINY_IDS = {token: index for index, token in enumerate(TINY_SPECIAL_TOKENS)}

PRESETS: dict[str, dict] = {
    "tiny": {
        "vision_config": TINY_VISION,
        "text_config": {
            "model_type": "phi3",
            **TINY_TEXT,
            "original_max_position_embeddings": 1024,
            "bos_token_id": TINY_IDS["<s>"],
            "eos_token_id": TINY_IDS["<|endoftext|>"],
            "pad_token_id": TINY_IDS["<pad>"],
        },
        **TINY_PERCEIVER,
        "image_token_id": TINY_IDS["<image>"],
        "assistant_header": "<|assistant|>",
        "chat_template": PHI3_CHAT_TEMPLATE,
    },
    "tiny-llama": {
        "vision_config": TINY_VISION,
        "text_config": {
            "model_type": "llama",
            **TINY_TEXT,
            "bos_token_id": TINY_IDS["<s>"],
            "eos_token_id": TINY_IDS["<|eot_id|>"],
            "pad_token_id": TINY_IDS["<pad>"],
        },
        "connector_type": "mlp",
        "image_token_id": TINY_IDS["<image>"],
        "assistant_header": "<|start_header_id|>assistant<|end_header_id|>",
        "chat_template": LLAMA3_CHAT_TEMPLATE,
    },
    "aki-4b": {
        "vision_config": {"model_type": "siglip_vision_model", **SIGLIP_SO400M_384},
        "text_config": PHI35_MINI,
        "connector_type": "perceiver",
        "image_token_id": 32012,
        "assistant_marker_ids": [32001],
        "chat_template": PHI3_CHAT_TEMPLATE,
    },
    "aki-llama3.2-3b": {
        "vision_config": {"model_type": "siglip_vision_model", **SIGLIP_SO400M_384},
        "text_config": LLAMA32_3B,
        "tie_word_embeddings": True,  # as Llama-3.2-3B's; transformers ties by the top-level flag
        "connector_type": "perceiver",
        "image_token_id": 128256,
        "assistant_marker_ids": [128006, 78191, 128007],
        "chat_template": LLAMA3_CHAT_TEMPLATE,
    },
}


def with_heads_of_32(name: str, num_key_value_heads: int) -> dict:
    """A tiny preset with 2 attention heads of 32 (64 wide): vLLM's CPU attention kernel takes head sizes
    32, 64, 80, ..., not the tiny presets' 16."""
    preset = copy.deepcopy(PRESETS[name])
    preset["text_config"].update(num_attention_heads=2, num_key_value_heads=num_key_value_heads)
    return preset


PRESETS["tiny-vllm"] = with_heads_of_32("tiny", num_key_value_heads=2)  # Phi-3 behind a Perceiver
PRESETS["tiny-llama-vllm"] = with_heads_of_32("tiny-llama", num_key_value_heads=1)  # Llama, MLP, grouped queries

# Words for the tiny tokenizer's merges: the template, and the vocabulary of the demo.
TINY_CORPUS = [
    AKI_SYSTEM_PROMPT,
    "system user assistant",
    "What is in the image? Describe the image. What colour is the shape? Where is the circle?",
    "Is there a red square in the top left? Answer with a single word. yes no",
    "red green blue yellow circle square triangle top bottom left right middle a the of in on and is",
]


def _check_preset(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
    return copy.deepcopy(PRESETS[name])


def build_tiny_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with the special tokens of both chat formats, built offline.

    Training is deterministic, so the ids are the same on every machine; the special tokens take
    ids 0..len(TINY_SPECIAL_TOKENS)-1 (`TINY_IDS`), and `<s>` is prepended to every encoding.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_TEXT["vocab_size"],
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TINY_CORPUS, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", TINY_IDS["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        chat_template=chat_template,
    )


def config_from_preset(name: str, tokenizer=None, **overrides) -> AkiConfig:
    """The `AkiConfig` of a preset. `overrides` replace fields (e.g. attention_policy); a dict
    given for `vision_config` or `text_config` updates the preset's rather than replacing it."""
    preset = _check_preset(name)
    preset.pop("chat_template")
    header = preset.pop("assistant_header", None)
    if header is not None:
        tokenizer = tokenizer or build_tiny_tokenizer()
        preset["assistant_marker_ids"] = tokenizer.encode(header, add_special_tokens=False)
    for key, value in overrides.items():
        if key in ("vision_config", "text_config") and isinstance(value, dict):
            value = {**preset[key], **value}
        preset[key] = value
    return AkiConfig(**preset)


def processor_from_preset(name: str, config: AkiConfig | None = None) -> AkiProcessor:
    """The processor of a tiny preset (the real presets' tokenizers come with their checkpoints)."""
    preset = _check_preset(name)
    if "assistant_header" not in preset:
        raise ValueError(f"Preset {name!r} uses its checkpoint's tokenizer; load it with AutoProcessor.")
    config = config or config_from_preset(name)
    return AkiProcessor(
        image_processor=AkiImageProcessor(
            size={"height": config.vision_config.image_size, "width": config.vision_config.image_size}
        ),
        tokenizer=build_tiny_tokenizer(),
        num_image_tokens=config.num_image_tokens,
        chat_template=preset["chat_template"],
    )


CONNECTOR_FIELDS = (
    "connector_type",
    "connector_norm",
    "perceiver_num_latents",
    "perceiver_depth",
    "perceiver_heads",
    "perceiver_head_dim",
    "perceiver_ff_mult",
)


def vision_and_connector(name: str, **overrides) -> tuple[dict, dict]:
    """A preset's vision config and connector fields (after `overrides`), to build in front of a
    pretrained language model with `aki.assemble.from_parts`."""
    config = config_from_preset(name, **overrides)
    return config.vision_config.to_dict(), {field: getattr(config, field) for field in CONNECTOR_FIELDS}


def build_tiny(name: str = "tiny", seed: int = 0, **overrides):
    """A randomly initialised tiny model and its processor: `(model, processor)`."""
    from .modeling_aki import AkiForConditionalGeneration

    config = config_from_preset(name, **overrides)
    torch.manual_seed(seed)
    model = AkiForConditionalGeneration(config).eval()
    return model, processor_from_preset(name, config)


__all__ = [
    "PRESETS",
    "config_from_preset",
    "processor_from_preset",
    "vision_and_connector",
    "build_tiny",
    "build_tiny_tokenizer",
]
