"""AkiProcessor: SigLIP image preprocessing, the chat template and `<image>` expansion."""

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers import ProcessorMixin
from transformers.image_utils import PILImageResampling
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
from transformers.processing_utils import MultiModalData

AKI_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)

# Shared pieces of the chat templates: the system prompt (AKI's by default) and a message's
# content, where each image becomes `<image>` and a newline (`image_separator=""` renders
# `<image>{text}`, the prompt VLMEvalKit gave AKI).
_SYSTEM = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] if messages[0]['content'] is string "
    "else messages[0]['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}"
    "{%- set messages = messages[1:] -%}"
    "{%- else -%}{%- set system = '" + AKI_SYSTEM_PROMPT.replace("'", "\\'") + "' -%}{%- endif -%}"
)
_CONTENT = (
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<image>' + (image_separator if image_separator is defined else '\n') }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
)

# AKI-4B's prompt (docs/checkpoint.md), BOS first; the answer is closed by <|endoftext|>. The template writes
# the BOS itself, as Phi-3's and Llama 3's own templates do, so a server that renders it and tokenizes without
# special tokens (vLLM's chat endpoint) gets the same ids as `AkiProcessor`, which then adds no second BOS.
PHI3_CHAT_TEMPLATE = (
    _SYSTEM + "{{ bos_token + '<|system|>\n' + system + '<|end|>\n' }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ '<|user|>\n' }}" + _CONTENT + "{{ '<|end|>\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '<|assistant|>\n' }}" + _CONTENT + "{{ '<|endoftext|>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)

# Llama-3 headers, for Llama backbones, BOS first: the assistant marker is a three-token header.
LLAMA3_CHAT_TEMPLATE = (
    _SYSTEM + "{{ bos_token + '<|start_header_id|>system<|end_header_id|>\n\n' + system + '<|eot_id|>' }}"
    "{%- for message in messages -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}" + _CONTENT + "{{ '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif -%}"
)


# ChatML, for Qwen2 backbones and other ChatML tokenizers (SmolLM), which add no BOS: the marker is
# `<|im_start|>assistant`.
CHATML_CHAT_TEMPLATE = (
    _SYSTEM + "{{ '<|im_start|>system\n' + system + '<|im_end|>\n' }}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}" + _CONTENT + "{{ '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


class AkiImageProcessor(SiglipImageProcessorPil):
    """AKI-4B's preprocessing (docs/checkpoint.md): bicubic resize to a 384 square (aspect ratio not
    kept), [0, 1], mean 0.5 std 0.5.

    PIL only: the official transforms resized PIL images, and torchvision's tensor resize
    rounds differently, so this class has no torchvision backend to be swapped in for it.
    """

    size = {"height": 384, "width": 384}
    resample = PILImageResampling.BICUBIC
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]


def flatten_images(images) -> list:
    """One image, a list of images, or one list per sample -> a flat list."""
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in flatten_images(item)]
    if getattr(images, "ndim", 0) == 4:  # a batch array or tensor (n, ...)
        return list(images)
    return [images]


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. 16-bit integer modes keep their scale (PIL's own conversion clips them to white),
    float modes go through `array_to_rgb`, and transparency is composited onto white."""
    if image.mode.startswith("I"):  # "I;16*" and "I" (how PIL opens 16-bit PNGs)
        array = np.asarray(image)
        return array_to_rgb(array if array.dtype == np.uint16 else np.clip(array, 0, 65535).astype(np.uint16))
    if image.mode == "F":
        return array_to_rgb(np.asarray(image))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


# round(x / 257) for every 16-bit value: 257 is odd, so no x / 257 falls on a half and (x + 128) // 257 is it.
UINT16_TO_UINT8 = ((np.arange(65536, dtype=np.uint32) + 128) // 257).astype(np.uint8)


def array_to_rgb(array) -> Image.Image:
    """An image array or tensor (H, W), (H, W, C) or (C, H, W) with 1, 3 or 4 channels -> 8-bit RGB.

    uint8 is taken as is, uint16 as 16 bits, other integers must lie in [0, 255] and floats in
    [0, 1] (the scale transformers' image processors give them).
    """
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        array = (array.float() if array.is_floating_point() else array).numpy()
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (1, 3, 4))) or min(array.shape[:2]) == 0:
        raise ValueError(
            f"An image must be (H, W), (H, W, C) or (C, H, W) with 1, 3 or 4 channels; got shape {array.shape}."
        )
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype == np.uint16:
        array = UINT16_TO_UINT8[array]  # round(x / 257), with no wide copy of a large image
    elif np.issubdtype(array.dtype, np.floating):
        if not (np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1):
            raise ValueError(
                f"A float image must hold values in [0, 1], got [{array.min()}, {array.max()}]; "
                "pass uint8 for values in [0, 255]."
            )
        array = (array * 255.0).round()
    elif array.dtype != np.uint8 and (array.min() < 0 or array.max() > 255):
        raise ValueError(f"An integer image must hold values in [0, 255], got [{array.min()}, {array.max()}].")
    array = array.astype(np.uint8)
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[array.shape[-1] if array.ndim == 3 else 2]
    return to_rgb(Image.fromarray(array, mode))


def load_image(image) -> Image.Image:
    """8-bit RGB from a path, encoded bytes, a PIL image, or an array / tensor (`array_to_rgb`);
    raise a ValueError that names the problem (PIL's decompression-bomb guard included)."""
    if isinstance(image, bytes):
        image = io.BytesIO(image)
    if isinstance(image, (str, Path, io.IOBase)):
        name = str(image) if isinstance(image, (str, Path)) else "from bytes"
        try:
            with Image.open(image) as opened:
                return to_rgb(opened)
        except Image.DecompressionBombError as error:
            raise ValueError(f"Image {name!r} is too large to decode: {error}") from error
        except (OSError, UnidentifiedImageError) as error:
            raise ValueError(f"Cannot read image {name!r}: {error}") from error
    if isinstance(image, Image.Image):
        return to_rgb(image)
    return array_to_rgb(image)


class AkiProcessor(ProcessorMixin):
    r"""
    Turns chat text and images into AKI inputs.

    Each `<image>` in the text becomes `num_image_tokens` placeholder tokens, images become
    `pixel_values` (n, 3, H, W), and the count of `<image>` markers must match the images given.

    Args:
        image_processor: an `AkiImageProcessor`.
        tokenizer: the language model's tokenizer, holding `<image>` as a special token.
        num_image_tokens: how many tokens one image takes (`AkiConfig.num_image_tokens`).
        chat_template: a Jinja chat template (`PHI3_CHAT_TEMPLATE` for AKI-4B).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens: int = 144,
        chat_template: str | None = None,
        image_token: str = "<image>",
        **kwargs,
    ):
        self.num_image_tokens = num_image_tokens
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"The tokenizer has no {image_token!r} token; add it as a special token.")
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    def save_pretrained(self, *args, **kwargs):
        # transformers writes `auto_map` (from the registration `import aki` makes) onto the processor it saves:
        # it belongs in the file, not on this object, which must stay equal to one loaded from that file.
        try:
            return super().save_pretrained(*args, **kwargs)
        finally:
            self.__dict__.pop("auto_map", None)

    def prepare_inputs_layout(self, images=None, text=None, videos=None, audio=None, **kwargs):
        if images is not None:
            images = [load_image(image) for image in flatten_images(images)]
        if text is not None and kwargs.get("add_special_tokens", True):
            texts = [self.with_one_bos(t) for t in (text if isinstance(text, list | tuple) else [text])]
            text = texts if isinstance(text, list | tuple) else texts[0]
        return super().prepare_inputs_layout(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def with_one_bos(self, text: str) -> str:
        """`text` as the tokenizer (adding its special tokens) must see it for the ids to hold one BOS.

        A rendered chat template already starts with BOS: a tokenizer that adds one gets the text without
        it. A text starting with an image gets the BOS written first even when the tokenizer adds none
        (SmolLM2's): position 0 is where a pretrained LM parks the attention it does not use (the
        attention sink), and an image there is hardly read at all."""
        tokenizer = self.tokenizer
        if not isinstance(text, str) or tokenizer.bos_token is None:
            return text
        adds_bos = tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]
        if adds_bos and text.startswith(tokenizer.bos_token):
            return text[len(tokenizer.bos_token) :]
        if not adds_bos and text.startswith(self.image_token):
            return tokenizer.bos_token + text
        return text

    @property
    def template_writes_bos(self) -> bool:
        """Whether the chat template renders the tokenizer's BOS first (AKI's templates do, where the
        tokenizer has one to add), so a rendered prompt must be tokenized without special tokens."""
        bos = self.tokenizer.bos_token
        if bos is None or self.chat_template is None:
            return False
        rendered = self.apply_chat_template([{"role": "user", "content": "?"}], tokenize=False)
        return rendered.startswith(bos)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.num_image_tokens

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> MultiModalData:
        """Placeholder tokens per image of the given (height, width) sizes, as in-tree VLMs report them
        to serving engines (vLLM): every image is resized to one square, so `num_image_tokens` each."""
        if image_sizes is None:
            return MultiModalData()
        return MultiModalData(
            num_image_tokens=[self.num_image_tokens] * len(image_sizes), num_image_patches=[1] * len(image_sizes)
        )

    def question_inputs(self, image, question: str):
        """Tensors for one user turn, an image and a question, ending in the assistant header."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = self.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self(images=image, text=prompt, return_tensors="pt")


__all__ = [
    "AkiImageProcessor",
    "AkiProcessor",
    "PHI3_CHAT_TEMPLATE",
    "LLAMA3_CHAT_TEMPLATE",
    "CHATML_CHAT_TEMPLATE",
    "AKI_SYSTEM_PROMPT",
]
