"""Train AKI: pre-training (captions, causal attention) or instruction tuning (chats, MMA).

    deepspeed training/train.py --config configs/aki4b_sft.yaml
    torchrun --nproc_per_node 2 training/train.py --config configs/tiny_sft.yaml
    aki-train --config configs/tiny_pretrain.yaml          (or python training/train.py)

With `deepspeed:` in the config the DeepSpeed engine runs the optimisation (ZeRO 2/3), under
any of the three launchers; without it, plain PyTorch (DDP when several processes run).

The loss of a step is the mean over every supervised token of the global batch (all ranks, all
accumulation steps), whatever the split, so 1 process and N processes give the same numbers.
Checkpoints hold the model, optimiser, scheduler and step; the data stream is a function of the
step (see `aki_training.data`), so a resumed run continues the same loss curve.
"""

import argparse
import json
import logging
import math
import os
import pickle
import shutil
import socket
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader
from tqdm import tqdm

from aki.commands import add_debug_flag, model_folder, run_command
from aki_training.config import ModelConfig, TrainConfig, load_config
from aki_training.data import TrainStream, build_source, sample_encoder, supervised_tokens, tokens_in

logger = logging.getLogger("aki.train")


# ----------------------------------------------------------------------------- distributed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world size, device). A plain process with DeepSpeed gets a world of one."""
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else None
    device = device or torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if cfg.deepspeed:
        import deepspeed

        # DeepSpeed looks for MPI without these; a plain `python train.py` is a world of one.
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        deepspeed.init_distributed(dist_backend=backend)
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def all_sum(value: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item())


def all_counter(counter: Counter, device: torch.device) -> Counter:
    if not dist.is_initialized():
        return counter
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, dict(counter))
    return sum((Counter(part) for part in gathered), Counter())


# ----------------------------------------------------------------------------- model


def assembly_parts(model: ModelConfig) -> tuple[str | dict, dict]:
    """For an AKI assembled around `model.language_model`: its vision tower (a SigLIP folder, or
    the preset's vision config for a fresh tower) and its connector fields (the preset's, and `overrides`)."""
    import aki

    if "text_config" in model.overrides:
        raise ValueError("`overrides.text_config` cannot reshape a pretrained `language_model`.")
    if model.vision_model:
        if "vision_config" in model.overrides:
            raise ValueError("`overrides.vision_config` cannot reshape a pretrained `vision_model`.")
        return model.vision_model, dict(model.overrides)
    if not model.preset:
        raise ValueError("`language_model` needs a `vision_model` folder or a `preset` whose vision tower to build.")
    return aki.presets.vision_and_connector(model.preset, **model.overrides)


def check_folders(model: ModelConfig) -> None:
    """Each folder the model config names exists (transformers would read a missing one as a Hub repo id)."""
    for key in ("pretrained", "language_model", "vision_model"):
        if getattr(model, key):
            model_folder(getattr(model, key), f"model.{key}")


def build_model(cfg: TrainConfig, device: torch.device | str = "cpu"):
    """(model, processor) from a native checkpoint, a pretrained language model (see `ModelConfig`), or a preset,
    with the attention the config names ("auto": the default for `device`)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import aki

    check_folders(cfg.model)
    policy = "causal" if cfg.stage == "pretrain" else (cfg.model.attention_policy or "mma")
    if cfg.model.pretrained:
        model = AutoModelForImageTextToText.from_pretrained(cfg.model.pretrained, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(cfg.model.pretrained)
        model.config.attention_policy = policy
    elif cfg.model.language_model:
        torch.manual_seed(cfg.seed)  # the connector's (and a preset vision tower's) initialisation
        vision, connector = assembly_parts(cfg.model)
        model, processor = aki.assemble.from_parts(
            vision, cfg.model.language_model, attention_policy=policy, **connector
        )
    elif cfg.model.vision_model:
        raise ValueError("`vision_model` needs a `language_model` to assemble an AKI around.")
    elif cfg.model.preset:
        torch.manual_seed(cfg.seed)
        overrides = {**cfg.model.overrides, "attention_policy": policy}
        model, processor = aki.presets.build_tiny(cfg.model.preset, seed=cfg.seed, **overrides)
    else:
        raise ValueError("model needs `pretrained`, `language_model` (with `vision_model` or a preset's), or `preset`.")
    implementation = cfg.model.attn_implementation
    if implementation == "auto":
        implementation = aki.split_attention.default_attn_implementation(device)
    model.set_attn_implementation(implementation)
    return model, processor


def set_trainable(model, cfg: TrainConfig):
    """Freeze what the config keeps fixed; returns the model (wrapped by peft for LoRA)."""
    parts = cfg.model.trainable
    model.requires_grad_(False)
    model.model.connector.requires_grad_(True)
    if parts in ("connector+llm", "all"):
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    if parts in ("vision+connector", "all"):  # vision+connector: a fresh tower in front of a frozen LM
        model.model.vision_tower.requires_grad_(True)
    if parts == "lora":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as error:
            raise ImportError("model.trainable: lora needs peft (pip install peft).") from error
        lora = LoraConfig(
            r=cfg.model.lora_rank,
            lora_alpha=cfg.model.lora_alpha,
            target_modules=r".*language_model.*\.(qkv_proj|o_proj|q_proj|k_proj|v_proj|gate_up_proj|down_proj|gate_proj|up_proj)",
            modules_to_save=["connector"],
        )
        model = get_peft_model(model, lora)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def parameter_groups(model, weight_decay: float, new_parts_lr: float | None = None) -> list[dict]:
    """AdamW groups: no weight decay on embeddings, norms, biases and the Perceiver latents. With
    `new_parts_lr`, the connector and vision tower get groups of their own at that rate (the language
    model's groups keep `optim.lr`); the schedule scales every group alike."""
    groups = [{"params": [], "weight_decay": weight_decay}, {"params": [], "weight_decay": 0.0}]
    if new_parts_lr is not None:
        groups += [{**group, "params": [], "lr": new_parts_lr} for group in groups]
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        plain = parameter.ndim < 2 or "embed" in name or "norm" in name or name.endswith("latents")
        new = new_parts_lr is not None and (".connector." in name or ".vision_tower." in name)
        groups[2 * new + plain]["params"].append(parameter)
    return groups


def cosine_with_warmup(step: int, cfg: TrainConfig) -> float:
    """LR multiplier: linear warmup, then cosine from lr down to min_lr at max_steps."""
    warmup = cfg.optim.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.max_steps - warmup))
    floor = cfg.optim.min_lr / cfg.optim.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------- engines


def load_weights_only(path: Path, map_location, allowed: list | None = None):
    """`torch.load` of tensors and plain containers (and the `allowed` classes) only, so a checkpoint
    from elsewhere cannot run code; anything else is refused naming the file."""
    try:
        with torch.serialization.safe_globals(allowed or []):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[-1].strip()
        raise ValueError(f"{path} holds more than tensors; refusing to load it ({reason}).") from None


class TorchEngine:
    """Plain PyTorch (DDP with several processes) behind the same few calls as DeepSpeed's engine."""

    def __init__(self, model, optimizer, scheduler, cfg: TrainConfig, device):
        self.module, self.optimizer, self.scheduler, self.cfg = model, optimizer, scheduler, cfg
        # Unused parameters happen: a micro-batch without images never reaches the connector.
        distributed = dist.is_initialized()
        self.model = (
            torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if distributed else model
        )
        self.micro_steps, self.device = 0, device

    def __call__(self, **batch):
        return self.model(**batch)

    def backward(self, loss):
        (loss / self.cfg.gradient_accumulation_steps).backward()
        self.micro_steps += 1

    def step(self) -> float:
        if self.micro_steps % self.cfg.gradient_accumulation_steps:
            return float("nan")
        trainable = [p for p in self.module.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(trainable, self.cfg.optim.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def save(self, folder: Path):
        if not dist.is_initialized() or dist.get_rank() == 0:
            folder.mkdir(parents=True, exist_ok=True)
            names = self._trainable_names()
            trainable = {k: v for k, v in self.module.state_dict().items() if k in names}
            payload = {
                "model": trainable,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
            }
            torch.save(payload, folder / "engine.pt")

    def load(self, folder: Path) -> None:
        payload = load_weights_only(folder / "engine.pt", self.device)
        self.module.load_state_dict(payload["model"], strict=False)
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])

    def _trainable_names(self) -> set[str]:
        return {name for name, p in self.module.named_parameters() if p.requires_grad}


class DeepSpeedEngine:
    """DeepSpeed's engine; gradient accumulation, clipping and the schedule happen inside it."""

    def __init__(self, model, optimizer, scheduler, cfg: TrainConfig, world_size: int):
        import deepspeed

        config = json.loads(Path(cfg.deepspeed).read_text())
        for section in ("optimizer", "scheduler"):
            if section in config:
                raise ValueError(f"{cfg.deepspeed}: remove '{section}'; the optimiser and schedule come from the YAML.")
        config.update(
            train_micro_batch_size_per_gpu=cfg.micro_batch_size,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            train_batch_size=cfg.micro_batch_size * cfg.gradient_accumulation_steps * world_size,
            gradient_clipping=cfg.optim.max_grad_norm,
        )
        config["bf16"] = {"enabled": cfg.bf16}
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config
        )
        self.module = self.engine.module

    def __call__(self, **batch):
        return self.engine(**batch)

    def backward(self, loss):
        self.engine.backward(loss)

    def step(self) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def save(self, folder: Path):
        self.engine.save_checkpoint(str(folder.parent), tag=folder.name)

    def load(self, folder: Path) -> None:
        # DeepSpeed unpickles its files with weights_only=False: each is read weights-only first
        # (DeepSpeed's own state classes allowed), so a checkpoint from elsewhere runs no code.
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        for path in sorted(folder.glob("*.pt")):
            load_weights_only(path, "cpu", [DynamicLossScaler, LossScaler, ZeroStageEnum, fragment_address])
        self.engine.load_checkpoint(str(folder.parent), tag=folder.name)


# ----------------------------------------------------------------------------- training


def predicting_positions(labels: torch.Tensor) -> torch.Tensor:
    """labels (b, s) -> the positions (k,) whose logits predict a supervised token in any row.

    Passed as `logits_to_keep`, so the LM head runs on these k positions only: an answer is a few
    tokens of a long prompt, and the head over a large vocabulary is a fifth of a small LM's compute.
    """
    return (labels[:, 1:] != -100).any(0).nonzero().squeeze(-1)


def loss_sum(model_outputs, labels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over supervised tokens; `model_outputs.logits` (b, k, V) holds
    the logits at `positions` (k,)."""
    logits = model_outputs.logits.float()
    targets = labels[:, positions + 1]
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")


def to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    moved = {k: v.to(device) for k, v in batch.items() if v is not None}
    if "pixel_values" in moved:
        moved["pixel_values"] = moved["pixel_values"].to(dtype)
    return moved


def read_metrics(path: Path) -> list[dict]:
    """The rows of `metrics.jsonl`; a last line cut short by a kill is dropped from the file."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines) - 1:
                raise ValueError(f"{path} line {number + 1} is not JSON; remove it and run again.") from None
            logger.warning("%s: dropping its last line, cut short (%r)", path, line)
            path.write_text("".join(line + "\n" for line in lines[:-1]))
    return rows


def save_loss_curve(metrics_path: Path, out: Path) -> None:
    from aki.attention_maps import import_pyplot

    plt = import_pyplot()
    rows = {}
    for record in read_metrics(metrics_path):
        rows[record["step"]] = record  # a resumed run rewrites the steps after its checkpoint
    steps = sorted(rows)
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot(steps, [rows[s]["loss"] for s in steps], label="loss")
    axis.set_xlabel("step")
    axis.set_ylabel("loss (mean per supervised token)")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)


def latest_checkpoint(output_dir: Path) -> Path | None:
    pointer = output_dir / "checkpoints" / "latest_step"
    if not pointer.exists():
        return None
    return output_dir / "checkpoints" / pointer.read_text().strip()


@dataclass
class Run:
    """What every step of a run needs: the engine (model, optimiser, schedule), the processor, where it runs."""

    cfg: TrainConfig
    engine: TorchEngine | DeepSpeedEngine
    processor: object
    device: torch.device
    rank: int
    world_size: int
    dtype: torch.dtype  # of pixel values: DeepSpeed's bf16 mode casts the model itself
    autocast: torch.autocast  # plain PyTorch trains fp32 weights under bf16 autocast

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.output_dir)


@dataclass
class Progress:
    """Where a run stands; a checkpoint saves it and a resumed run starts from it."""

    step: int = 0
    loss: float = float("nan")
    skipped: Counter = field(default_factory=Counter)  # samples dropped, by reason
    notes: Counter = field(default_factory=Counter)  # samples shortened, by reason
    supervised_tokens: int = 0  # trained on so far, over all ranks


@dataclass
class TrainResult:
    """The end of `train`: the last step and its loss, sample counts over all ranks, and the export
    (None when the run stopped early at `stop_after`)."""

    step: int
    loss: float
    skipped: dict[str, int]
    notes: dict[str, int]
    export: str | None


def set_up(cfg: TrainConfig) -> Run:
    """Processes, output folder (with the resolved config), model and engine."""
    rank, world_size, device = init_distributed(cfg)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    output_dir = Path(cfg.output_dir)
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))

    torch.manual_seed(cfg.seed)
    model, processor = build_model(cfg, device)
    model = set_trainable(model, cfg).to(device)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("%s: %.2fM trainable parameters, world size %d, %s", cfg.stage, trainable / 1e6, world_size, device)

    optimizer = torch.optim.AdamW(
        parameter_groups(model, cfg.optim.weight_decay, cfg.optim.new_parts_lr), lr=cfg.optim.lr, betas=cfg.optim.betas
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_with_warmup(step, cfg))
    if cfg.deepspeed:
        engine = DeepSpeedEngine(model, optimizer, scheduler, cfg, world_size)
    else:
        engine = TorchEngine(model, optimizer, scheduler, cfg, device)
    dtype = torch.bfloat16 if cfg.bf16 and cfg.deepspeed else torch.float32
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16 and not cfg.deepspeed)
    return Run(cfg, engine, processor, device, rank, world_size, dtype, autocast)


def resume(run: Run) -> Progress:
    """The progress saved by the latest complete checkpoint (its weights go into the engine), or a fresh start."""
    checkpoint = latest_checkpoint(run.output_dir)
    if checkpoint is None:
        return Progress()
    run.engine.load(checkpoint)
    state = json.loads((checkpoint / "state.json").read_text())
    logger.info("resumed from %s at step %d", checkpoint, state["step"])
    return Progress(
        state["step"],
        skipped=Counter(state["skipped"]),
        notes=Counter(state["notes"]),
        supervised_tokens=state["supervised_tokens"],
    )


def micro_batches(run: Run, start_step: int):
    """The data stream from optimiser step `start_step` on, one micro-batch item at a time."""
    cfg = run.cfg
    sources = [build_source(source, cfg.stage, cfg.seed) for source in cfg.data]
    stream = TrainStream(
        sources,
        [source.weight for source in cfg.data],
        sample_encoder(cfg.stage, run.processor, cfg.max_length, cfg.seed),
        cfg.micro_batch_size,
        run.processor.tokenizer.pad_token_id,
        cfg.seed,
        run.rank,
        run.world_size,
        start_micro_step=start_step * cfg.gradient_accumulation_steps,
        pack_to=cfg.max_length if cfg.packing else None,
        pad_to_multiple_of=cfg.pad_to_multiple_of,
    )
    return iter(DataLoader(stream, batch_size=None, num_workers=cfg.num_workers))


def optimiser_step(run: Run, items: list[dict]) -> dict[str, float]:
    """One optimiser step over a step's micro-batches; returns its metrics (loss per supervised token,
    gradient norm, tokens). The loss is normalised by the supervised tokens of the global batch."""
    engine, device = run.engine, run.device
    global_targets = all_sum(sum(supervised_tokens(item["batch"]) for item in items), device)
    scale = run.world_size * run.cfg.gradient_accumulation_steps / max(global_targets, 1.0)
    local_sum = 0.0
    for item in items:
        if item["batch"] is None:  # every sample skipped: a zero loss still joins the gradient all-reduce
            token = torch.tensor([[run.processor.tokenizer.pad_token_id]], device=device)
            loss = engine(input_ids=token, attention_mask=torch.ones_like(token)).logits.sum() * 0.0
        else:
            batch = to_device(item["batch"], device, run.dtype)
            labels = batch.pop("labels")
            positions = predicting_positions(labels)
            with run.autocast:
                outputs = engine(**batch, logits_to_keep=positions)
            summed = loss_sum(outputs, labels, positions)
            local_sum += float(summed.detach())
            loss = summed * scale
        engine.backward(loss)
    grad_norm = engine.step()
    return {
        "loss": all_sum(local_sum, device) / max(global_targets, 1.0),
        "grad_norm": grad_norm,
        "tokens": all_sum(sum(tokens_in(item["batch"]) for item in items), device),
        "supervised_tokens": int(global_targets),
    }


class MetricsLog:
    """Per-step metrics on the main rank: metrics.jsonl, TensorBoard and the progress bar."""

    def __init__(self, run: Run, start_step: int):
        self.path, self.writer = run.output_dir / "metrics.jsonl", None
        if run.is_main:
            from torch.utils.tensorboard import SummaryWriter

            read_metrics(self.path)  # drops a line cut short by a kill, before this run appends
            self.writer = SummaryWriter(str(run.output_dir / "tensorboard"))
        self.bar = tqdm(
            total=run.cfg.max_steps, initial=start_step, disable=not run.is_main, desc=run.cfg.stage, dynamic_ncols=True
        )

    def write(self, step: int, metrics: dict[str, float], lr: float, elapsed: float) -> None:
        if self.writer is None:
            return
        record = {
            "step": step,
            "loss": metrics["loss"],
            "lr": lr,
            "grad_norm": metrics["grad_norm"],
            "tokens_per_s": metrics["tokens"] / elapsed,
        }
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
            self.writer.add_scalar(f"train/{key}", record[key], step)
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def finish(run: Run, progress: Progress) -> TrainResult:
    """The data report, then (unless the run trained on nothing) the export and, on the main rank, the loss curve."""
    skipped, notes = all_counter(progress.skipped, run.device), all_counter(progress.notes, run.device)
    report = {
        "step": progress.step,
        "loss": progress.loss,
        "supervised_tokens": progress.supervised_tokens,
        "skipped": dict(skipped),
        "notes": dict(notes),
    }
    report_path = run.output_dir / "data_report.json"
    if run.is_main:
        report_path.write_text(json.dumps(report, indent=2))
    if progress.supervised_tokens == 0:  # an untrained export would look like a result
        raise RuntimeError(
            f"The run trained on no sample: every one was skipped (skipped: {dict(skipped) or 'none'}); "
            f"see {report_path}. Check the data paths, image_root and max_length."
        )
    export_dir = run.output_dir / "final"
    export(run.engine, run.processor, export_dir, run.cfg, run.is_main)
    result = TrainResult(progress.step, progress.loss, dict(skipped), dict(notes), str(export_dir))
    if run.is_main:
        save_loss_curve(run.output_dir / "metrics.jsonl", run.output_dir / "loss_curve.png")
        logger.info("skipped samples: %s", result.skipped or "none")
        logger.info("shortened samples: %s", result.notes or "none")
        logger.info("exported %s; loss curve %s", export_dir, run.output_dir / "loss_curve.png")
    return result


def train(cfg: TrainConfig) -> TrainResult:
    """Run the configured training: set up, resume, step (logging and checkpointing), export."""
    run = set_up(cfg)
    progress = resume(run)
    loader = micro_batches(run, progress.step)
    log = MetricsLog(run, progress.step)
    while progress.step < cfg.max_steps:
        started = time.perf_counter()
        items = [next(loader) for _ in range(cfg.gradient_accumulation_steps)]
        for item in items:
            progress.skipped.update(item["skipped"])
            progress.notes.update(item["notes"])
        metrics = optimiser_step(run, items)
        progress.step, progress.loss = progress.step + 1, metrics["loss"]
        progress.supervised_tokens += metrics["supervised_tokens"]
        log.write(progress.step, metrics, run.engine.optimizer.param_groups[0]["lr"], time.perf_counter() - started)
        step = progress.step
        if (cfg.save_every and step % cfg.save_every == 0) or step in (cfg.max_steps, cfg.stop_after):
            save_checkpoint(run, progress)
        if step == cfg.stop_after:
            log.close()
            return TrainResult(step, progress.loss, dict(progress.skipped), dict(progress.notes), export=None)
    log.close()
    return finish(run, progress)


def save_checkpoint(run: Run, progress: Progress) -> None:
    """Engine tensors and progress (counts over all ranks, as JSON) under checkpoints/step_N, then the pointer."""
    skipped, notes = all_counter(progress.skipped, run.device), all_counter(progress.notes, run.device)
    folder = run.output_dir / "checkpoints" / f"step_{progress.step}"
    run.engine.save(folder)
    if run.is_main:  # the pointer moves only once the checkpoint is complete
        state = {
            "step": progress.step,
            "skipped": dict(skipped),
            "notes": dict(notes),
            "supervised_tokens": progress.supervised_tokens,
        }
        (folder / "state.json").write_text(json.dumps(state))
        pointer = run.output_dir / "checkpoints" / "latest_step"
        temporary = pointer.with_suffix(".tmp")
        temporary.write_text(folder.name)
        temporary.replace(pointer)
    if dist.is_initialized():
        dist.barrier()


def export(engine, processor, folder: Path, cfg: TrainConfig, is_main: bool) -> None:
    """`save_pretrained` of the trained model (LoRA merged, ZeRO-3 shards gathered) and its processor."""
    module = engine.module
    if cfg.deepspeed and json.loads(Path(cfg.deepspeed).read_text()).get("zero_optimization", {}).get("stage") == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if is_main else None
    else:
        state = None
    if is_main:
        if hasattr(module, "merge_and_unload"):  # LoRA
            module = module.merge_and_unload()
        if folder.exists():
            shutil.rmtree(folder)
        module.save_pretrained(folder, state_dict=state)
        processor.save_pretrained(folder)
    if dist.is_initialized():
        dist.barrier()


def parse_overrides(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if not key or not _:
            raise ValueError(f"--set takes KEY=VALUE, got {pair!r}.")
        overrides[key] = yaml.safe_load(value)
    return overrides


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a YAML file under configs/")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. optim.lr=1e-3")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by `deepspeed`
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    run_command(lambda: train_and_close(load_config(args.config, parse_overrides(args.set))), args.debug)


def train_and_close(cfg: TrainConfig) -> TrainResult:
    try:
        return train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
