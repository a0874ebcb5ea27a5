"""A fresh AKI from a pretrained vision tower and a pretrained causal LM (the start of pre-training).

    model, processor = aki.assemble.from_parts("siglip-so400m-patch14-384", "Phi-3.5-mini-instruct")

The vision tower may instead be a SigLIP vision config (a dict), built with random weights: a
small tower trained from scratch in front of a pretrained LM (`python -m aki_demo --language-model`).

The tokenizer gains `<pad>` (when it has none, or it equals EOS), `<image>` and `<|endofchunk|>`,
as the official factory does. Embedding and head rows of existing ids are copied; rows of the
new `<image>` and `<|endofchunk|>` ids start from N(0, initializer_range). The connector is new.
"""

from typing import NamedTuple

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .configuration_aki import AkiConfig
from .modeling_aki import AkiForConditionalGeneration
from .processing_aki import (
    CHATML_CHAT_TEMPLATE,
    LLAMA3_CHAT_TEMPLATE,
    PHI3_CHAT_TEMPLATE,
    AkiImageProcessor,
    AkiProcessor,
)


class ChatFormat(NamedTuple):
    """A chat format a backbone may speak: the language model's family picks it, its tokenizer confirms it."""

    template: str
    assistant_header: str
    sign: str  # a special token that shows a tokenizer speaks this format
    end_of_answer: str  # what the template closes an answer with: generation stops there


CHAT_FORMATS = {
    "phi3": ChatFormat(PHI3_CHAT_TEMPLATE, "<|assistant|>", "<|assistant|>", "<|endoftext|>"),
    "llama3": ChatFormat(
        LLAMA3_CHAT_TEMPLATE, "<|start_header_id|>assistant<|end_header_id|>", "<|start_header_id|>", "<|eot_id|>"
    ),
    "chatml": ChatFormat(CHATML_CHAT_TEMPLATE, "<|im_start|>assistant", "<|im_start|>", "<|im_end|>"),
}
FAMILY_FORMATS = {"phi3": "phi3", "llama": "llama3", "qwen2": "chatml"}
NEW_TOKENS = ("<image>", "<|endofchunk|>")


def aki_tokenizer(language_model: str):
    tokenizer = AutoTokenizer.from_pretrained(language_model)
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    missing = [token for token in NEW_TOKENS if token not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    if getattr(tokenizer, "add_eos_token", False):
        tokenizer.add_eos_token = False
    return tokenizer


def chat_format(model_type: str, tokenizer) -> str:
    """The family's chat format when the tokenizer has its special token, else the first format
    whose token it has (SmolLM is a Llama that speaks ChatML)."""
    vocab = tokenizer.get_vocab()
    preferred = FAMILY_FORMATS.get(model_type)
    candidates = ([preferred] if preferred else []) + [name for name in CHAT_FORMATS if name != preferred]
    for name in candidates:
        if CHAT_FORMATS[name].sign in vocab:
            return name
    tokens = ", ".join(chat.sign for chat in CHAT_FORMATS.values())
    raise ValueError(f"No chat format fits this {model_type!r} tokenizer: it has none of {tokens}.")


def vision_state(vision_model: str | dict) -> tuple[dict, dict]:
    """(vision config dict, vision tower state dict) from a SigLIP vision or full SigLIP folder;
    a config dict gives an empty state (random weights)."""
    if isinstance(vision_model, dict):
        config, state = vision_model, {}
    else:
        loaded = AutoModel.from_pretrained(vision_model, dtype=torch.float32)
        tower = getattr(loaded, "vision_model", loaded)
        config = (loaded.config.vision_config if hasattr(loaded.config, "vision_config") else loaded.config).to_dict()
        state = {k: v for k, v in tower.state_dict().items() if not k.startswith("head.")}
    return {**config, "model_type": "siglip_vision_model", "vision_use_head": False}, state


def from_parts(vision_model: str | dict, language_model: str, **config_overrides):
    """A new `AkiForConditionalGeneration` and its `AkiProcessor` from the two pretrained folders
    (or a vision config dict and the language model's folder)."""
    tokenizer = aki_tokenizer(language_model)
    text_config = AutoConfig.from_pretrained(language_model)
    chat = CHAT_FORMATS[chat_format(text_config.model_type, tokenizer)]
    vision_config, vision_weights = vision_state(vision_model)
    text = {**text_config.to_dict(), "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    config = AkiConfig(
        vision_config=vision_config,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        assistant_marker_ids=tokenizer.encode(chat.assistant_header, add_special_tokens=False),
        **{"tie_word_embeddings": text_config.tie_word_embeddings, **config_overrides},  # the top level decides tying
    )
    model = AkiForConditionalGeneration(config)
    if vision_weights:
        missing, unexpected = model.model.vision_tower.load_state_dict(vision_weights, strict=False)
        if missing or unexpected:
            raise ValueError(f"Vision weights do not fit: missing {missing}, unexpected {unexpected}.")

    language = AutoModelForCausalLM.from_pretrained(language_model, dtype=torch.float32)
    body = {k: v for k, v in language.model.state_dict().items() if not k.startswith("embed_tokens.")}
    missing, unexpected = model.model.language_model.load_state_dict(body, strict=False)
    if [k for k in missing if not k.startswith("embed_tokens.")] or unexpected:
        raise ValueError(f"Language weights do not fit: missing {missing}, unexpected {unexpected}.")
    fresh = {tokenizer.convert_tokens_to_ids(token) for token in NEW_TOKENS}
    with torch.no_grad():
        for target, source in (
            (model.get_input_embeddings().weight, language.get_input_embeddings().weight),
            (model.lm_head.weight, language.get_output_embeddings().weight),
        ):
            rows = min(target.shape[0], source.shape[0])
            kept = torch.tensor([i not in fresh for i in range(rows)])
            target[:rows][kept] = source[:rows][kept]
        if config.connector_norm:  # image tokens start at the scale of the LM's words
            words = language.get_input_embeddings().weight
            model.model.connector.norm.weight.fill_(float(words.pow(2).mean(-1).sqrt().mean()))
    # A base model's EOS (e.g. Qwen2's <|endoftext|>) is not what the template ends answers with.
    eos = text_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    model.generation_config.eos_token_id = sorted({*eos, tokenizer.get_vocab().get(chat.end_of_answer)} - {None})

    size = config.vision_config.image_size
    processor = AkiProcessor(
        image_processor=AkiImageProcessor(size={"height": size, "width": size}),
        tokenizer=tokenizer,
        num_image_tokens=config.num_image_tokens,
        chat_template=chat.template,
    )
    return model, processor


__all__ = ["from_parts", "chat_format"]
