"""AKI model configuration."""

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .masking import AttentionPolicy

# SigLIP-so400m-patch14-384, the vision tower of AKI-4B (docs/checkpoint.md).
SIGLIP_SO400M_384 = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 384,
    "patch_size": 14,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
    "vision_use_head": False,
}


@strict
class AkiConfig(PreTrainedConfig):
    r"""
    Configuration of an AKI model: a vision tower, a connector that turns its patch features into
    a fixed number of image tokens, and any transformers causal LM.

    Args:
        vision_config: the vision tower (SigLIP vision by default, features = `last_hidden_state`).
        text_config: the language model (Phi-3 by default; Llama, Qwen2, ... work the same way).
        connector_type: `"perceiver"` (Flamingo-style resampler, as in AKI-4B) or `"mlp"`
            (Linear-GELU-Linear on every patch, LLaVA-style).
        connector_norm: the MLP connector ends in an RMSNorm, so image tokens keep one scale, the
            language model's word-embedding scale (`aki.assemble.from_parts` starts the norm's weight
            there). A fresh connector in front of a small pretrained LM otherwise drifts to image
            tokens many times the norm of any word (docs/demo/experiments.md).
        perceiver_num_latents, perceiver_depth, perceiver_heads, perceiver_head_dim, perceiver_ff_mult:
            the resampler's shape; AKI-4B uses 144 latents, 6 layers, 8 heads x 64, feed-forward x4.
        image_token_id: the id of the image placeholder token.
        assistant_marker_ids: the token ids of the assistant header that closes a user turn. Its
            first token is the last key an image may see under MMA (docs/mma.md).
        attention_policy: `"mma"` (modality-mutual attention) or `"causal"` (the baseline).
        lm_head_bias: whether the output layer adds a bias. The official AKI-4B's head has one (its
            decoupled head kept `nn.Linear`'s default `bias=True`); models built here have none.

    Example:

    ```python
    >>> import aki
    >>> config = aki.presets.config_from_preset("tiny")
    >>> model = aki.AkiForConditionalGeneration(config)
    ```"""

    model_type = "aki"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig, model_type="siglip_vision_model", init_kwargs=SIGLIP_SO400M_384
        ),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="phi3"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    connector_type: Literal["perceiver", "mlp"] = "perceiver"
    connector_norm: bool = False
    perceiver_num_latents: int = 144
    perceiver_depth: int = 6
    perceiver_heads: int = 8
    perceiver_head_dim: int = 64
    perceiver_ff_mult: int = 4
    image_token_id: int = 32012
    assistant_marker_ids: list[int] | None = None
    attention_policy: AttentionPolicy = "mma"
    lm_head_bias: bool = False
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.assistant_marker_ids is None:
            self.assistant_marker_ids = [32001]  # Phi-3.5's <|assistant|>
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Part of `@strict` validation: reject settings the model cannot honour."""
        if not self.assistant_marker_ids:
            raise ValueError("assistant_marker_ids must hold at least one token id.")
        if self.image_token_id in self.assistant_marker_ids:
            raise ValueError("image_token_id cannot also be an assistant marker token.")
        if self.connector_norm and self.connector_type != "mlp":
            raise ValueError("connector_norm needs connector_type='mlp' (the perceiver ends in its own LayerNorm).")

    @property
    def num_image_tokens(self) -> int:
        """How many placeholder tokens one image expands to."""
        if self.connector_type == "perceiver":
            return self.perceiver_num_latents
        return (self.vision_config.image_size // self.vision_config.patch_size) ** 2


__all__ = ["AkiConfig"]
