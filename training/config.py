"""Training configuration: plain dataclasses read from YAML, with unknown keys and wrong types refused by key."""

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from aki.masking import ATTENTION_POLICIES, AttentionPolicy

Stage = Literal["pretrain", "sft"]
TRAINABLE_PARTS = ("connector", "vision+connector", "connector+llm", "all", "lora")


@dataclass
class ModelConfig:
    """Where the model comes from: a native checkpoint, a pretrained language model, or a preset.

    With `language_model` (a causal LM folder) the AKI is new. Its vision tower comes from the
    `vision_model` folder, with AKI-4B's connector; or, without one, the preset gives a fresh tower
    and its connector. `overrides` may change the connector's fields.
    """

    preset: str | None = "tiny"
    overrides: dict = field(default_factory=dict)  # AkiConfig fields for a preset, e.g. perceiver_num_latents
    pretrained: str | None = None  # a native AKI folder (e.g. the pre-training export)
    vision_model: str | None = None  # a SigLIP folder
    language_model: str | None = None  # a causal LM folder (Phi-3, Llama, Qwen2, ...)
    attention_policy: AttentionPolicy | None = None  # overrides the checkpoint's; pretrain forces "causal"
    # auto: aki_split on the CPU, sdpa elsewhere (aki.split_attention.default_attn_implementation);
    # or eager | sdpa | flex_attention | aki_split (FlashAttention-2 on CUDA)
    attn_implementation: str = "auto"
    trainable: str = "connector+llm"  # connector | vision+connector | connector+llm | all | lora
    lora_rank: int = 16
    lora_alpha: int = 32
    gradient_checkpointing: bool = False


@dataclass
class DataSource:
    """One dataset of the run. `kind` picks the reader; `weight` its share of an SFT mixture."""

    kind: str  # webdataset | hf_dataset | llava_json | task | python
    path: str = ""  # python: the source's `module:callable`, e.g. aki_demo.shapes:ShapesSource
    weight: float = 1.0
    size: int = 256  # python only: how many items
    options: dict = field(default_factory=dict)  # python only: the callable's keywords (ShapesSource: grid, most, ...)
    task: str | None = None  # for kind == "task": vqa, gqa, vsr, ocrvqa, aokvqa, scienceqa, refcoco, vg, llava
    image_root: str | None = None
    image_column: str = "image"
    text_column: str = "text"


@dataclass
class OptimConfig:
    lr: float = 1e-4
    min_lr: float = 1e-5  # the cosine's floor; with new_parts_lr, those groups end at the same fraction
    # The connector's and vision tower's rate, when it should differ from the language model's (a
    # fresh connector learns at about 1e-3 while a pretrained LM is tuned at about 2e-5). None: lr.
    new_parts_lr: float | None = None
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    max_grad_norm: float = 1.0


@dataclass
class TrainConfig:
    stage: Stage
    output_dir: str
    data: list[DataSource]
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    max_steps: int = 100
    micro_batch_size: int = 4  # per process
    gradient_accumulation_steps: int = 1
    max_length: int = 512  # tokens, image tokens included
    packing: bool = False  # several samples per row, each with its own masks
    pad_to_multiple_of: int = 1  # e.g. 128: batch lengths fall in buckets, so compiled kernels do not recompile
    num_workers: int = 0
    seed: int = 42
    bf16: bool = False
    deepspeed: str | None = None  # a DeepSpeed JSON; its batch and clipping fields are filled from here
    save_every: int = 0  # steps; 0 = only at the end
    stop_after: int | None = None  # exit (without export) after this step, for resume tests

    def __post_init__(self):
        if self.stage not in ("pretrain", "sft"):
            raise ValueError(f"stage must be 'pretrain' or 'sft', got {self.stage!r}.")
        policy = self.model.attention_policy
        if policy not in (None, *ATTENTION_POLICIES):
            raise ValueError(f"model.attention_policy must be one of {ATTENTION_POLICIES} or unset, got {policy!r}.")
        if self.model.trainable not in TRAINABLE_PARTS:
            raise ValueError(f"model.trainable must be one of {TRAINABLE_PARTS}, got {self.model.trainable!r}.")
        if not self.data:
            raise ValueError("The config lists no data.")


# Counts and sizes that must be at least 1 (0 would train on nothing or divide by zero).
POSITIVE = {"max_steps", "micro_batch_size", "gradient_accumulation_steps", "max_length", "pad_to_multiple_of", "size"}


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def checked(value, annotation, key: str):
    """`value` as the field's type wants it (an int is a fine float, a list a fine tuple); else a
    ValueError naming `key`. YAML gives the types, so nothing is parsed from strings here."""
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in arguments:
            return None
        (annotation,) = [argument for argument in arguments if argument is not type(None)]
        return checked(value, annotation, key)
    if origin is Literal:
        if value not in arguments:
            raise ValueError(f"{key} must be one of {', '.join(map(repr, arguments))}, got {value!r}.")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(arguments):
            raise ValueError(f"{key} must be a list of {len(arguments)} numbers, got {value!r}.")
        return tuple(
            checked(item, argument, f"{key}[{i}]")
            for i, (item, argument) in enumerate(zip(value, arguments, strict=True))
        )
    expected = {
        bool: ("true or false", lambda v: isinstance(v, bool)),
        int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
        float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
        str: ("a string", lambda v: isinstance(v, str)),
        dict: ("a mapping", lambda v: isinstance(v, dict)),
    }
    if annotation in expected:
        wanted, accepts = expected[annotation]
        if not accepts(value):
            hint = ""
            if annotation is float and isinstance(value, str) and is_number(value):
                hint = f" YAML reads exponents without a dot as text: write {float(value):.1e}."
            raise ValueError(f"{key} must be {wanted}, got {value!r} ({type(value).__name__}).{hint}")
        if key.rsplit(".", 1)[-1] in POSITIVE and value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}.")
        return float(value) if annotation is float else value
    return value


def _build(cls, values: dict[str, Any], where: str):
    """`cls` from `values`; `where` is the key path of `values` ("" at the top)."""
    if not isinstance(values, dict):
        raise ValueError(f"{where or 'The config'} must be a mapping, got {type(values).__name__}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(
            f"Unknown key(s) in {where or 'the config'}: {', '.join(unknown)}. Known: {', '.join(sorted(fields))}."
        )
    prefix = f"{where}." if where else ""
    hints = typing.get_type_hints(cls)
    nested = {"model": ModelConfig, "optim": OptimConfig}
    kwargs = {}
    for key, value in values.items():
        if key in nested:
            value = _build(nested[key], value, f"{prefix}{key}")
        elif key == "data":
            if not isinstance(value, list):
                raise ValueError(f"{prefix}data must be a list of sources, got {type(value).__name__}.")
            value = [_build(DataSource, item, f"{prefix}data[{i}]") for i, item in enumerate(value)]
        else:
            value = checked(value, hints[key], f"{prefix}{key}")
        kwargs[key] = value
    return cls(**kwargs)


def set_dotted(values: dict, dotted: str, value) -> None:
    """`values["optim"]["lr"] = value` for "optim.lr"; a number picks a list item ("data.0.path")."""
    target = values
    *parents, last = dotted.split(".")
    for depth, key in enumerate([*parents, last]):
        where = ".".join(parents[:depth]) or "the config"
        if isinstance(target, list):
            if not key.isdigit() or int(key) >= len(target):
                raise ValueError(f"--set {dotted}: {where} is a list of {len(target)} item(s); use an index below it.")
            key = int(key)
        elif not isinstance(target, dict):
            raise ValueError(f"--set {dotted}: {where} is {target!r}, not a mapping.")
        if depth == len(parents):
            target[key] = value
        elif isinstance(target, dict):
            target = target.setdefault(key, {})
        else:
            target = target[key]


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML config; `overrides` (dotted keys, e.g. {"optim.lr": 1e-3, "data.0.path": "x"}) replace its values."""
    values = yaml.safe_load(Path(path).read_text()) or {}
    try:
        for dotted, value in (overrides or {}).items():
            set_dotted(values, dotted, value)
        return _build(TrainConfig, values, "")
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
