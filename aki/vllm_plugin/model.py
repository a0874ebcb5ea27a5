"""AKI as a vLLM model: SigLIP from vLLM, AKI's connector, the language model from vLLM, MMA attention.

Loaded by vLLM through the plugin (`aki.vllm_plugin.register`) for a saved AKI folder whose
`config.json` names `AkiForConditionalGeneration`. The language model is vLLM's own (Llama,
Phi-3, Qwen2, ...); each of its attention layers is rebuilt on a backend that gives image tokens
their question: `MmaCPUAttentionBackend` on the CPU (`aki.vllm_plugin.attention`), FLASH_ATTN's
subclass on CUDA (`aki.vllm_plugin.flash`), checked at start against dense MMA
(`aki.vllm_plugin.self_check`).

Shape legend: ``n`` images in the step, ``v`` image tokens per image, ``d`` width.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn
from transformers import BatchFeature
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.logger import init_logger
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.siglip import SiglipVisionModel
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    WeightsMapper,
    init_vllm_registered_model,
    maybe_prefix,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageSize, MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    ProcessorInputs,
    PromptReplacement,
    PromptUpdate,
)
from vllm.platforms import current_platform
from vllm.sequence import IntermediateTensors
from vllm.v1.attention.backend import AttentionType

from ..configuration_aki import AkiConfig
from ..masking import mma_window_ids
from ..modeling_aki import AkiMultiModalProjector, AkiPerceiverResampler
from ..processing_aki import AkiProcessor
from .attention import MmaCPUAttentionBackend, MmaPlanner
from .engine_config import MMA_SCHEDULER
from .flash import flash_backend
from .self_check import check_mma_attention

# Under "vllm.", so that vLLM's logging configuration shows it.
logger = init_logger(f"vllm.{__name__}")

# vLLM's implementation of each language-model family AKI is built on.
LANGUAGE_MODELS = {"llama": "LlamaForCausalLM", "phi3": "Phi3ForCausalLM", "qwen2": "Qwen2ForCausalLM"}


class AkiProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self) -> AkiConfig:
        return self.ctx.get_hf_config(AkiConfig)

    def get_hf_processor(self, **kwargs: object) -> AkiProcessor:
        return self.ctx.get_hf_processor(AkiProcessor, **kwargs)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_image_size_with_most_features(self) -> ImageSize:
        size = self.get_hf_config().vision_config.image_size
        return ImageSize(width=size, height=size)

    def get_default_tok_params(self):
        """A text prompt is a rendered chat template; where the template writes the BOS (AKI's do), the
        tokenizer adds no second one, so `LLM.generate` on a rendered prompt gets `AkiProcessor`'s ids.
        The chat endpoint already tokenizes without special tokens."""
        params = super().get_default_tok_params()
        if self.get_hf_processor().template_writes_bos:
            params = dataclasses.replace(params, add_special_tokens=False)
        return params


class AkiDummyInputsBuilder(BaseDummyInputsBuilder[AkiProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return self.info.get_hf_processor().image_token * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        size = self.info.get_image_size_with_most_features()
        overrides = (mm_options or {}).get("image")
        images = self._get_dummy_images(
            width=size.width, height=size.height, num_images=mm_counts.get("image", 0), overrides=overrides
        )
        return {"image": images}


class AkiMultiModalProcessor(BaseMultiModalProcessor[AkiProcessingInfo]):
    """`AkiProcessor` expands each `<image>` to `num_image_tokens` placeholders; vLLM finds them there."""

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {"pixel_values": MultiModalFieldConfig.batched("image")}

    def _get_mm_hashes(self, inputs: ProcessorInputs):
        """vLLM's content hash of each image, widened to the image's MMA window (`window_identifiers`)."""
        hashes = super()._get_mm_hashes(inputs)
        if "image" in hashes:
            config = self.info.get_hf_config()
            hashes = {**hashes, "image": window_identifiers(inputs.prompt, hashes["image"], config)}
        return hashes

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        config = self.info.get_hf_config()
        placeholders = [config.image_token_id] * config.num_image_tokens
        return [PromptReplacement(modality="image", target=[config.image_token_id], replacement=placeholders)]


def window_identifiers(prompt: Sequence[int], image_hashes: list[str], config: AkiConfig) -> list[str]:
    """Each image's cache identifier: its content hash, and the tokens and images of its MMA window.

    vLLM keys an image's encoder output and every KV block the image overlaps by its identifier (a
    block's hash chains its prefix's, so the tokens after it follow). Under MMA an image's keys and
    values depend on its question too: with the window in the identifier, the same image under another
    question is another cache entry, while a system prompt before it and a finished turn are reused.
    `prompt` holds one `<image>` per image, or each already expanded; anything else is left to vLLM's
    own placeholder check.
    """
    ids = torch.tensor(list(prompt))
    positions = (ids == config.image_token_id).nonzero().flatten()
    per_image = len(positions) // max(len(image_hashes), 1)
    if per_image not in (1, config.num_image_tokens) or per_image * len(image_hashes) != len(positions):
        return image_hashes
    starts = positions[::per_image].tolist()
    window = mma_window_ids(ids[None], config.image_token_id, config.assistant_marker_ids)[0]
    identifiers = []
    for start, image_hash in zip(starts, image_hashes, strict=True):
        own = int(window[start])
        if own == 0:  # a turn without an assistant header: causal, nothing after the image matters
            identifiers.append(image_hash)
            continue
        end = int((window == -own).nonzero().max()) + 1
        later = [other for other_start, other in zip(starts, image_hashes, strict=True) if start < other_start < end]
        key = json.dumps([image_hash, ids[start:end].tolist(), later])
        identifiers.append(hashlib.sha256(key.encode()).hexdigest())
    return identifiers


def check_engine_config(vllm_config: VllmConfig) -> None:
    """Refuse, at start-up and in one line, the engine settings under which MMA would come out wrong."""
    reasons = []
    scheduler = vllm_config.scheduler_config
    if scheduler.enable_chunked_prefill and scheduler.scheduler_cls != MMA_SCHEDULER:
        reasons.append(
            f"chunked prefill is on under another scheduler ({scheduler.scheduler_cls}), which may end a chunk "
            f"between an image and its question: leave --scheduler-cls unset (AKI sets {MMA_SCHEDULER}) or "
            "pass --no-enable-chunked-prefill"
        )
    if vllm_config.speculative_config is not None:
        reasons.append("speculative decoding is on: AKI's MMA does not support it")
    if vllm_config.cache_config.cache_dtype != "auto":
        reasons.append(f"the KV cache is quantized ({vllm_config.cache_config.cache_dtype}): use --kv-cache-dtype auto")
    if not (current_platform.is_cpu() or current_platform.is_cuda()):
        reasons.append(
            f"exact MMA is implemented on vLLM's CPU and CUDA backends, not on {current_platform.device_name} "
            "(docs/vllm.md, 'On GPU')"
        )
    if reasons:
        raise ValueError("AKI with attention_policy='mma' cannot run here: " + "; ".join(reasons) + ".")


def with_mma_attention(language_model: nn.Module, planner: MmaPlanner, vllm_config: VllmConfig) -> None:
    """Rebuild each decoder attention layer of vLLM's language model on AKI's backend for the platform.

    vLLM's Llama, Phi-3 and Qwen2 build their `Attention` without an `attn_backend` argument, so
    each is rebuilt here, under the same layer name, with the same shape and that backend.
    """
    forward_context = get_current_vllm_config().compilation_config.static_forward_context
    max_model_len = vllm_config.model_config.max_model_len
    for module in list(language_model.modules()):
        for child_name, layer in list(module.named_children()):
            if not isinstance(layer, Attention) or layer.attn_type != AttentionType.DECODER:
                continue
            window = layer.impl.sliding_window
            if (
                layer.impl.alibi_slopes is not None
                or layer.impl.logits_soft_cap
                or layer.has_sink
                or layer.kv_sharing_target_layer_name is not None
            ):
                raise ValueError(
                    f"AKI's MMA does not support {layer.layer_name}'s ALiBi, soft-cap, sinks or shared KV cache."
                )
            if 0 < window < max_model_len:
                raise ValueError(
                    f"AKI's MMA does not support a sliding window ({window}) shorter than --max-model-len "
                    f"({max_model_len}): lower --max-model-len to {window}."
                )
            # The layer registered itself under its name; the rebuilt one takes that name over.
            del forward_context[layer.layer_name]
            rebuilt = Attention(
                layer.num_heads,
                layer.head_size,
                layer.impl.scale,
                num_kv_heads=layer.num_kv_heads,
                cache_config=vllm_config.cache_config,
                quant_config=layer.quant_config,
                prefix=layer.layer_name,
                attn_backend=MmaCPUAttentionBackend if current_platform.is_cpu() else flash_backend(),
                mma_planner=planner,
            )
            setattr(module, child_name, rebuilt)
            planner.layer_name = planner.layer_name or layer.layer_name


@MULTIMODAL_REGISTRY.register_processor(
    AkiMultiModalProcessor, info=AkiProcessingInfo, dummy_inputs=AkiDummyInputsBuilder
)
class AkiForConditionalGeneration(nn.Module, SupportsMultiModal):
    """AKI in vLLM; exact MMA at prefill, plain causal decoding (module docstring)."""

    # The step's token ids reach `forward` beside the embeddings: MMA finds images and questions in them.
    requires_raw_input_tokens = True
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={
            "model.vision_tower.": "vision_tower.vision_model.",
            "model.connector.": "connector.",
            "model.language_model.": "language_model.model.",
            "lm_head.": "language_model.lm_head.",
        }
    )

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return "<image>"
        raise ValueError(f"AKI takes images only, not {modality}.")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: AkiConfig = vllm_config.model_config.hf_config
        self.config = config
        self.configure_mm_token_handling(vocab_size=config.text_config.vocab_size, mm_token_ids=[config.image_token_id])
        with self._mark_tower_model(vllm_config, "image"):
            self.vision_tower = SiglipVisionModel(
                config.vision_config,
                vllm_config.quant_config,
                require_post_norm=True,
                prefix=maybe_prefix(prefix, "vision_tower"),
                use_head=False,
            )
            # The connector is AKI's own module; its attention (Perceiver) runs on PyTorch's SDPA, as
            # transformers' AKI does by default.
            connector_config = copy.deepcopy(config)
            connector_config._attn_implementation = "sdpa"
            if config.connector_type == "perceiver":
                self.connector = AkiPerceiverResampler(connector_config)
            else:
                self.connector = AkiMultiModalProjector(connector_config)
        text_config = config.text_config
        architectures = text_config.architectures or [LANGUAGE_MODELS.get(text_config.model_type, "")]
        if not architectures[0]:
            raise ValueError(
                f"AKI's vLLM plugin knows no vLLM model for a {text_config.model_type!r} language model; "
                f"it knows {sorted(LANGUAGE_MODELS)}."
            )
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config,
                hf_config=text_config,
                prefix=maybe_prefix(prefix, "language_model"),
                architectures=architectures,
            )
        if config.lm_head_bias:
            # The official AKI-4B's output layer has a bias, which vLLM's language models do not load.
            self.language_model.lm_head = ParallelLMHead(
                text_config.vocab_size,
                text_config.hidden_size,
                bias=True,
                quant_config=vllm_config.quant_config,
                prefix=maybe_prefix(prefix, "language_model.lm_head"),
            )
        self.mma_planner = None
        if config.attention_policy == "mma":
            check_engine_config(vllm_config)
            self.mma_planner = MmaPlanner(
                config.image_token_id, config.assistant_marker_ids, vllm_config.cache_config.block_size
            )
            with_mma_attention(self.language_model, self.mma_planner, vllm_config)
            layer = vllm_config.compilation_config.static_forward_context[self.mma_planner.layer_name]
            error = check_mma_attention(layer, self.mma_planner, vllm_config)
            logger.info(
                "AKI's MMA self-check passed on vLLM's %s attention backend: largest difference from dense MMA %.3g.",
                layer.attn_backend.get_name(),
                error,
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """pixel_values (n, 3, H, W) -> image tokens (n, v, d)."""
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return []
        if isinstance(pixel_values, list):
            pixel_values = torch.stack(pixel_values)
        features = self.vision_tower(pixel_values.to(self.vision_tower.dtype))
        return self.connector(features)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        # Outside the compiled language model: the plan is plain Python over this step's batch.
        if self.mma_planner is not None:
            self.mma_planner.plan(input_ids)
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        head = self.language_model.lm_head
        return self.language_model.logits_processor(head, hidden_states, embedding_bias=head.bias)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)
