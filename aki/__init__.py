"""AKI: multimodal LLMs with modality-mutual attention, native to Hugging Face transformers.

`import aki` registers the model with transformers' Auto classes, so `AutoConfig`, `AutoModel`,
`AutoModelForImageTextToText` and `AutoProcessor` load AKI folders without remote code, and
registers the "aki_split" attention implementation (MMA on flash kernels, `split_attention`).

Every folder AKI saves also carries its code (`auto_map` and the model's files, as Hub models whose
architecture transformers lacks do), so it loads with `trust_remote_code=True` where `aki` is not
installed, into the same classes.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageTextToText, AutoProcessor

from . import assemble, masking, presets, split_attention
from .configuration_aki import AkiConfig
from .modeling_aki import AkiForConditionalGeneration, AkiModel, AkiPreTrainedModel, PromptSplitError
from .processing_aki import AkiImageProcessor, AkiProcessor

AutoConfig.register(AkiConfig.model_type, AkiConfig, exist_ok=True)
AutoModel.register(AkiConfig, AkiModel, exist_ok=True)
AutoModelForImageTextToText.register(AkiConfig, AkiForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(AkiConfig, image_processor_classes={"pil": AkiImageProcessor}, exist_ok=True)
AutoProcessor.register(AkiConfig, AkiProcessor, exist_ok=True)
# save_pretrained then writes `auto_map` and copies each class's file (and what it imports relatively).
AkiConfig.register_for_auto_class()
AkiModel.register_for_auto_class("AutoModel")
AkiForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
AkiImageProcessor.register_for_auto_class("AutoImageProcessor")
AkiProcessor.register_for_auto_class("AutoProcessor")

__version__ = "0.1.0"

__all__ = [
    "AkiConfig",
    "AkiForConditionalGeneration",
    "AkiImageProcessor",
    "AkiModel",
    "AkiPreTrainedModel",
    "AkiProcessor",
    "PromptSplitError",
    "assemble",
    "masking",
    "presets",
    "split_attention",
]
