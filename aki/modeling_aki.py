"""AKI: a vision tower, a connector and a causal LM, with modality-mutual attention (MMA).

Shape legend: ``b`` batch, ``s`` sequence, ``n`` images in the batch, ``p`` patches per image,
``v`` image tokens per image, ``l`` Perceiver latents, ``d`` width, ``h`` heads, ``e`` head dim.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MultimodalBaseModelOutputWithPast,
    MultimodalCausalLMOutputWithPast,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from .configuration_aki import AkiConfig
from .mask_builder import create_language_model_attention, create_mma_mask, is_prepared_mask
from .masking import PromptSplitError, absolute_window_ids, mma_window_ids


@dataclass
class AkiModelOutputWithPast(MultimodalBaseModelOutputWithPast):
    pass


@dataclass
class AkiCausalLMOutputWithPast(MultimodalCausalLMOutputWithPast):
    pass


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention: (n, h, l, e) queries over (n, h, t, e) keys -> (n, l, h, e)."""
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


class AkiPerceiverAttention(nn.Module):
    """Latents attend to the image patches and to themselves (Flamingo's resampler attention)."""

    def __init__(self, config: AkiConfig):
        super().__init__()
        width = config.vision_config.hidden_size
        self.config = config
        self.num_heads = config.perceiver_heads
        self.head_dim = config.perceiver_head_dim
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        inner = self.num_heads * self.head_dim
        self.norm_media = nn.LayerNorm(width)
        self.norm_latents = nn.LayerNorm(width)
        self.to_q = nn.Linear(width, inner, bias=False)
        self.to_kv = nn.Linear(width, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, width, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """media (n, p, d), latents (n, l, d) -> (n, l, d)."""
        n, l, _ = latents.shape
        media, latents = self.norm_media(media), self.norm_latents(latents)
        query = self.to_q(latents)
        key, value = self.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1)
        query, key, value = (x.view(n, -1, self.num_heads, self.head_dim).transpose(1, 2) for x in (query, key, value))
        implementation = self.config._attn_implementation
        if implementation == "flex_attention":
            # The resampler has no mask, so flex brings nothing here; and torch 2.13's compiled flex,
            # called without a block mask, reused the vision tower's kernel for these other shapes
            # (wrong latents, NaN logits, measured on CPU).
            implementation = "sdpa"
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        output, _ = attention_interface(self, query, key, value, attention_mask=None, scaling=self.scaling)
        return self.to_out(output.reshape(n, l, -1))


class AkiPerceiverFeedForward(nn.Module):
    def __init__(self, config: AkiConfig):
        super().__init__()
        width = config.vision_config.hidden_size
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width * config.perceiver_ff_mult, bias=False)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(width * config.perceiver_ff_mult, width, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(hidden_states))))


class AkiPerceiverLayer(nn.Module):
    def __init__(self, config: AkiConfig):
        super().__init__()
        self.attention = AkiPerceiverAttention(config)
        self.feed_forward = AkiPerceiverFeedForward(config)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        latents = self.attention(media, latents) + latents
        return self.feed_forward(latents) + latents


class AkiPerceiverResampler(nn.Module):
    """Patch features (n, p, d_vision) -> a fixed number of image tokens (n, l, d_text)."""

    def __init__(self, config: AkiConfig):
        super().__init__()
        width = config.vision_config.hidden_size
        self.latents = nn.Parameter(torch.empty(config.perceiver_num_latents, width))
        self.layers = nn.ModuleList(AkiPerceiverLayer(config) for _ in range(config.perceiver_depth))
        self.norm = nn.LayerNorm(width)
        self.projection = nn.Linear(width, config.text_config.hidden_size)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        latents = self.latents.unsqueeze(0).expand(image_features.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(image_features, latents)
        return self.projection(self.norm(latents))


class AkiMultiModalProjector(nn.Module):
    """LLaVA-style connector: one image token per patch, (n, p, d_vision) -> (n, p, d_text)."""

    def __init__(self, config: AkiConfig):
        super().__init__()
        self.linear_1 = nn.Linear(config.vision_config.hidden_size, config.text_config.hidden_size)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(config.text_config.hidden_size, config.text_config.hidden_size)
        # Identity has no weights: checkpoints without the norm keep their keys.
        self.norm = nn.RMSNorm(config.text_config.hidden_size, eps=1e-6) if config.connector_norm else nn.Identity()

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.norm(self.linear_2(self.act(self.linear_1(image_features))))


def refuse_flex_padded_generation_on_cpu(config: AkiConfig, attention_mask: torch.Tensor | None, device) -> None:
    """PyTorch's Inductor CPU kernel for flex_attention fails to compile (CppCompileError) at the
    decode steps of a padded batch; unpadded batches and CUDA work. Say so before any work."""
    if (
        torch.device(device).type == "cpu"
        and config.text_config._attn_implementation == "flex_attention"
        and isinstance(attention_mask, torch.Tensor)
        and attention_mask.ndim == 2
        and not bool(attention_mask.all())
    ):
        raise ValueError(
            "flex_attention cannot generate from a padded batch on CPU: PyTorch's CPU flex_attention kernel "
            "fails to compile for its decode steps. Generate with attn_implementation='sdpa' or 'eager' "
            "(same outputs), or one prompt at a time."
        )


class AkiPreTrainedModel(PreTrainedModel):
    config: AkiConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["AkiPerceiverLayer"]
    _skip_keys_device_placement = "cache"
    _supports_sdpa = True
    _supports_flex_attn = True
    # flash_attention_2's mask builder drops mask functions, which would silently turn MMA into
    # causal attention. The language model refuses it; the vision tower may still use it.
    _supports_flash_attn = False
    _supports_attention_backend = True
    # Building the MMA mask looks at the data (does this chunk hold an image with a question?).
    _can_compile_fullgraph = False

    @classmethod
    def is_custom_code(cls) -> bool:
        # transformers' guard for out-of-tree models whose `_init_weights` writes tensors in place
        # skips every module without parameters of its own, and so skips the sub-models' own
        # initialisers on blocks such as SigLIP's attention and MLP: a vision tower missing from
        # a checkpoint came out initialised unlike `__init__`'s. AKI (and every transformers model
        # it holds) initialises through `transformers.initialization`, which leaves loaded tensors
        # alone, so the guard is not needed and each sub-model's own `_init_weights` runs.
        return False

    def save_pretrained(self, save_directory, *args, **kwargs):
        # A folder that carries its code (`import aki` registers the classes for it) serves AutoModel and
        # AutoModelForImageTextToText alike, as the local registration does; transformers records only the saved class.
        if self._auto_class is not None:
            module = type(self).__module__.rsplit(".", 1)[-1]
            models = {
                "AutoModel": f"{module}.AkiModel",
                "AutoModelForImageTextToText": f"{module}.AkiForConditionalGeneration",
            }
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **models}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module):
        # Sub-models (vision tower, language model) are dispatched to their own `_init_weights` by
        # `initialize_weights`; this one sees AKI's own modules only.
        super()._init_weights(module)
        if isinstance(module, AkiPerceiverResampler):
            # As the official code builds Flamingo's resampler: latents ~ N(0, 1) and PyTorch's default
            # Linear init. Trained from scratch with N(0, 0.02) everywhere instead, it was much slower
            # to start reading the image (docs/demo/experiments.md).
            init.normal_(module.latents, std=1.0)
            for linear in module.modules():
                if isinstance(linear, nn.Linear):
                    init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
                    if linear.bias is not None:
                        bound = 1 / math.sqrt(linear.in_features)
                        init.uniform_(linear.bias, -bound, bound)


class AkiModel(AkiPreTrainedModel):
    """Vision tower + connector + language model, without a language-modelling head."""

    def __init__(self, config: AkiConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        if config.connector_type == "perceiver":
            self.connector = AkiPerceiverResampler(config)
        else:
            self.connector = AkiMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        size = self.config.vision_config.image_size
        expected = (3, size, size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape (num_images, {', '.join(map(str, expected))}), got "
                f"{tuple(pixel_values.shape)}. Use AkiProcessor to resize and normalise images."
            )

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.Tensor, **kwargs: Unpack[TransformersKwargs]
    ) -> BaseModelOutputWithPooling:
        """pixel_values (n, 3, H, W) -> `pooler_output` (n, v, d_text), the image tokens.

        `kwargs` such as `output_hidden_states` and `output_attentions` reach the vision tower.
        """
        self.check_pixel_values(pixel_values)
        vision_outputs = self.vision_tower(pixel_values=pixel_values, **{**kwargs, "return_dict": True})
        vision_outputs.pooler_output = self.connector(vision_outputs.last_hidden_state)
        return vision_outputs

    def get_placeholder_mask(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """Where the image tokens go, (b, s, 1); the counts of tokens and features must agree."""
        is_image = input_ids == self.config.image_token_id
        num_tokens, (num_images, tokens_per_image) = int(is_image.sum()), image_features.shape[:2]
        if num_tokens != num_images * tokens_per_image:
            raise ValueError(
                f"The text holds {num_tokens} image tokens, but {num_images} image(s) of "
                f"{tokens_per_image} tokens each were given ({num_images * tokens_per_image} tokens). Each "
                f"<image> must be expanded to {tokens_per_image} tokens, once per image: use AkiProcessor."
            )
        # Each run of image tokens holds whole images (adjacent images make one longer run); a
        # right total with runs of 7 and 9 tokens for 8-token images would misplace features.
        edges = F.pad(is_image.int(), (1, 1)).diff(dim=-1)  # +1 where a run starts, -1 after it ends
        runs = (edges == -1).nonzero()[:, 1] - (edges == 1).nonzero()[:, 1]
        if (runs % tokens_per_image).any():
            sizes = " and ".join(str(size) for size in runs.tolist())
            raise ValueError(
                f"The text holds blocks of {sizes} image tokens; each block must hold a multiple of "
                f"{tokens_per_image} (one image's tokens): expand each <image> with AkiProcessor."
            )
        return is_image.unsqueeze(-1)

    def special_ids_from_embeddings(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """The ids (b, s) of the tokens MMA looks for, read back from `inputs_embeds`; -1 elsewhere.

        Image placeholders and assistant-header tokens are found where the embeddings equal their
        rows of the embedding table, as llava finds its image slots in `inputs_embeds`.
        """
        token_ids = torch.tensor(
            [self.config.image_token_id, *self.config.assistant_marker_ids], device=inputs_embeds.device
        )
        rows = self.get_input_embeddings()(token_ids).to(inputs_embeds.dtype)  # (k, d)
        matches = (inputs_embeds[:, :, None, :] == rows).all(-1)  # (b, s, k)
        return torch.where(matches.any(-1), token_ids[matches.int().argmax(-1)], -1)

    def window_ids(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The MMA window ids (b, s) of `input_ids`; see `aki.masking`."""
        config = self.config
        return mma_window_ids(
            input_ids, config.image_token_id, config.assistant_marker_ids, attention_mask, document_ids
        )

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        mma_window_ids: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> AkiModelOutputWithPast:
        r"""
        input_ids (b, s): text with every image expanded to `config.num_image_tokens` placeholders.
        pixel_values (n, 3, H, W): the images, in the order their placeholders appear over (b, s).
        attention_mask (b, past + s): 1 for real tokens, 0 for padding; or a prepared 4D mask.
        mma_window_ids (b, >= past + s): optional window ids from the start of the sequence
            (`aki.masking.mma_window_ids`); computed from `input_ids` when omitted. `generate`
            passes them so a prompt split between an image and its question raises.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
            special_ids = input_ids
        else:
            special_ids = self.special_ids_from_embeddings(inputs_embeds)
        past_length = cache.get_seq_length() if cache is not None else 0

        image_outputs = None
        has_image_tokens = bool((special_ids == self.config.image_token_id).any())
        if pixel_values is not None and (has_image_tokens or past_length == 0):
            image_outputs = self.get_image_features(pixel_values, return_dict=True)
            image_features = image_outputs.pooler_output.to(inputs_embeds.device, inputs_embeds.dtype)
            placeholders = self.get_placeholder_mask(special_ids, image_features)
            inputs_embeds = inputs_embeds.masked_scatter(placeholders, image_features)
        elif has_image_tokens and past_length == 0:
            raise ValueError(
                "The text holds image tokens but no pixel_values were given: pass the images, or remove "
                f"the placeholders (token id {self.config.image_token_id})."
            )
        # Otherwise the images were encoded by an earlier forward and live in the cache: `generate`
        # passes pixel_values again when it continues from a cache (assisted and prompt-lookup
        # decoding do), and a verification chunk may start inside the prompt.

        attention = create_language_model_attention(
            self.config, special_ids, inputs_embeds, attention_mask, position_ids, cache, mma_window_ids
        )
        outputs = self.language_model(
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **attention,
            **kwargs,
        )
        return AkiModelOutputWithPast(**outputs, image_outputs=image_outputs)


class AkiForConditionalGeneration(AkiPreTrainedModel, GenerationMixin):
    """AKI with its language-modelling head; `generate()` applies MMA at prefill."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    # Shard the head as the embedding it may be tied to is sharded (as llava does).
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: AkiConfig):
        super().__init__(config)
        self.model = AkiModel(config)
        self.lm_head = nn.Linear(
            config.text_config.hidden_size, config.text_config.vocab_size, bias=config.lm_head_bias
        )
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_image_features(
        self, pixel_values: torch.Tensor, **kwargs: Unpack[TransformersKwargs]
    ) -> BaseModelOutputWithPooling:
        return self.model.get_image_features(pixel_values, **kwargs)

    def generate(self, *args, tokenizer=None, **kwargs):
        refuse_flex_padded_generation_on_cpu(self.config, kwargs.get("attention_mask"), self.device)
        # Stop strings read a tokenizer's vocabulary; callers holding an AkiProcessor (transformers' server) pass it.
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        return super().generate(*args, tokenizer=tokenizer, **kwargs)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        mma_window_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> AkiCausalLMOutputWithPast:
        r"""
        Arguments as in `AkiModel.forward`, plus `labels` (b, s) with -100 where no loss is taken
        (shifted inside the loss, as in every transformers causal LM).
        """
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            mma_window_ids=mma_window_ids,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return AkiCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=outputs.image_outputs,
        )

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        mma_window_ids: torch.LongTensor | None = None,
        **kwargs,
    ):
        # Window ids are read by absolute position, so they are computed on the whole sequence,
        # before `generate` slices `input_ids` down to the new tokens. Decode steps hold only
        # generated text: they need none and keep the causal fast path.
        use_cache = kwargs.get("use_cache", True)
        empty_cache = cache is None or cache.get_seq_length() == 0
        # An assistant model's prefill (assisted decoding) is not `generate`'s first iteration.
        prefill = is_first_iteration or not use_cache or empty_cache
        needs_windows = prefill and self.config.attention_policy == "mma" and input_ids.shape[-1] > 0
        if needs_windows and (mma_window_ids is None or not use_cache):
            mma_window_ids = self.model.window_ids(input_ids, attention_mask)
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            cache=cache,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        model_inputs["mma_window_ids"] = mma_window_ids if needs_windows else None
        # `generate` drops pixel_values after its first iteration, so an assistant model would
        # prefill the image's placeholders without the image. Every forward that starts on an empty
        # cache gets them: the assistant then reads the image exactly as the main model does.
        if empty_cache and kwargs.get("pixel_values") is not None:
            model_inputs["pixel_values"] = kwargs["pixel_values"]
        # With a compileable (static) cache `generate` has already built a causal 4D mask; the
        # prefill of an image with its question needs the MMA one instead.
        if needs_windows and is_prepared_mask(model_inputs.get("attention_mask")) and attention_mask is not None:
            model_inputs["attention_mask"] = self._static_prefill_mask(
                model_inputs, attention_mask, mma_window_ids, cache
            )
        return model_inputs

    def _static_prefill_mask(self, model_inputs, attention_mask, mma_window_ids, cache):
        chunk = model_inputs.get("input_ids")
        query_length = chunk.shape[-1] if chunk is not None else model_inputs["inputs_embeds"].shape[1]
        past_length = cache.get_seq_length() if cache is not None else 0
        window_ids = absolute_window_ids(mma_window_ids, past_length, query_length)
        if not (window_ids[:, past_length:] > 0).any():
            return model_inputs["attention_mask"]
        metadata = torch.empty((window_ids.shape[0], query_length, 0), dtype=self.dtype, device=window_ids.device)
        return create_mma_mask(self.config.text_config, metadata, attention_mask, cache, window_ids)


__all__ = ["AkiPreTrainedModel", "AkiModel", "AkiForConditionalGeneration", "PromptSplitError"]
