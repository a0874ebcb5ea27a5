"""A fresh AKI from a pretrained vision tower and a pretrained causal LM (the start of pre-training).

    model, processor = aki.assemble.from_parts("siglip-so400m-patch14-384", "Phi-3.5-mini-instruct")

The tokenizer gains `<pad>` (when it has none, or it equals EOS), `<image>` and `<|endofchunk|>`,
as the official factory does. Embedding and head rows of existing ids are copied; rows of the
new `<image>` and `<|endofchunk|>` ids start from N(0, initializer_range). The connector is new.
"""

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .configuration_aki import AkiConfig
from .modeling_aki import AkiForConditionalGeneration
from .processing_aki import LLAMA3_CHAT_TEMPLATE, PHI3_CHAT_TEMPLATE, AkiImageProcessor, AkiProcessor

# Chat format per language-model family: (template, assistant header).
CHAT_FORMATS = {
    "phi3": (PHI3_CHAT_TEMPLATE, "<|assistant|>"),
    "llama": (LLAMA3_CHAT_TEMPLATE, "<|start_header_id|>assistant<|end_header_id|>"),
}
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


def vision_state(vision_model: str) -> tuple[dict, dict]:
    """(vision config dict, vision tower state dict) from a SigLIP vision or full SigLIP folder."""
    loaded = AutoModel.from_pretrained(vision_model, dtype=torch.float32)
    tower = getattr(loaded, "vision_model", loaded)
    config = loaded.config.vision_config if hasattr(loaded.config, "vision_config") else loaded.config
    state = {k: v for k, v in tower.state_dict().items() if not k.startswith("head.")}
    return {**config.to_dict(), "model_type": "siglip_vision_model", "vision_use_head": False}, state


def from_parts(vision_model: str, language_model: str, **config_overrides):
    """A new `AkiForConditionalGeneration` and its `AkiProcessor` from the two pretrained folders."""
    tokenizer = aki_tokenizer(language_model)
    text_config = AutoConfig.from_pretrained(language_model)
    if text_config.model_type not in CHAT_FORMATS:
        raise ValueError(
            f"No chat format is known for {text_config.model_type!r} models; known: {sorted(CHAT_FORMATS)}."
        )
    template, header = CHAT_FORMATS[text_config.model_type]
    vision_config, vision_weights = vision_state(vision_model)
    text = {**text_config.to_dict(), "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    config = AkiConfig(
        vision_config=vision_config,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        assistant_marker_ids=tokenizer.encode(header, add_special_tokens=False),
        **config_overrides,
    )
    model = AkiForConditionalGeneration(config)
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
    if config.tie_word_embeddings or text_config.tie_word_embeddings:
        model.tie_weights()

    size = config.vision_config.image_size
    processor = AkiProcessor(
        image_processor=AkiImageProcessor(size={"height": size, "width": size}),
        tokenizer=tokenizer,
        num_image_tokens=config.num_image_tokens,
        chat_template=template,
    )
    return model, processor


__all__ = ["from_parts"]
