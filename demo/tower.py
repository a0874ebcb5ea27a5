"""A tiny vision tower pre-trained as SigLIP was (contrastively, with the sigmoid loss), on the
synthetic scenes; cached by its settings.

Real AKI never starts from a random tower: SigLIP arrives pretrained and only the connector is
new. Nothing pretrained for vision can be downloaded here, so the SmolLM2 ablation pre-trains its
own. The scenes' analogue of SigLIP's web captions are region captions: each patch (one per grid
cell) is paired with the words of its cell ("red square", or "empty"). The text side is a learnt
bag of those words. SigLIP's loss runs over every (patch, caption) pair of a batch, the patches of
all its scenes against the captions they hold; a patch's positives are the pairs with its own caption.

Shapes: `n` scenes, `p` patches per scene, `c` distinct region captions, `d` the joint width.

    python -m aki_demo.tower --out .cache/aki_demo
"""

import argparse
import hashlib
import json
import logging
import math
import time
from importlib import resources
from pathlib import Path

import torch
import yaml
from torch import nn
from tqdm import tqdm

from .shapes import COLOURS, SHAPES, ShapesSource, scene

logger = logging.getLogger("aki_demo.tower")
CONFIG = resources.files("aki_demo") / "configs" / "demo_smollm2_tower.yaml"
EMPTY = "empty"
REGION_CAPTIONS = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES] + [EMPTY]


def warmup_cosine(step: int, steps: int, warmup: int) -> float:
    """LR multiplier: linear warm-up, then cosine to zero at `steps`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def pixel_values(images: list, image_size: int) -> torch.Tensor:
    """Images as AKI's processor gives them to the tower: (n, 3, h, w)."""
    from aki.processing_aki import AkiImageProcessor

    processor = AkiImageProcessor(size={"height": image_size, "width": image_size})
    return processor(images, return_tensors="pt")["pixel_values"]


def scenes_and_regions(data: dict, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` scenes of seed `seed`: their pixels (n, 3, h, w) and each patch's region caption
    index into REGION_CAPTIONS (n, p), patches row by row like the grid's cells."""
    source = ShapesSource(count, seed, **data)
    regions = torch.full((count, source.grid * source.grid), REGION_CAPTIONS.index(EMPTY))
    for index in range(count):
        for colour, shape, cell in scene(seed, index, source.grid, source.most, source.least, source.distinct):
            regions[index, cell] = REGION_CAPTIONS.index(f"{colour} {shape}")
    images = [source[index]["image"] for index in range(count)]
    return pixel_values(images, source.image_size), regions


class RegionCaptionEncoder(nn.Module):
    """The text tower: a region caption is the mean of its words' learnt embeddings, projected to `d`."""

    def __init__(self, width: int):
        super().__init__()
        words = sorted({word for caption in REGION_CAPTIONS for word in caption.split()})
        caption_words = [[words.index(word) for word in caption.split()] for caption in REGION_CAPTIONS]
        longest = max(len(ids) for ids in caption_words)
        padded = torch.tensor([ids + [ids[0]] * (longest - len(ids)) for ids in caption_words])
        counts = torch.tensor([[1.0] * len(ids) + [0.0] * (longest - len(ids)) for ids in caption_words])
        self.register_buffer("caption_words", padded, persistent=False)
        self.register_buffer("word_weights", counts / counts.sum(-1, keepdim=True), persistent=False)
        self.words = nn.Embedding(len(words), width)
        self.projection = nn.Linear(width, width)

    def forward(self) -> torch.Tensor:
        """All region captions, unit length: (c, d)."""
        bag = (self.words(self.caption_words) * self.word_weights.unsqueeze(-1)).sum(1)
        return nn.functional.normalize(self.projection(bag), dim=-1)


def sigmoid_loss(patches: torch.Tensor, captions: torch.Tensor, regions: torch.Tensor, scale, bias) -> torch.Tensor:
    """SigLIP's loss. patches (n*p, d) and captions (c, d) unit length, regions (n*p,) the index of
    each patch's own caption; only the captions present in the batch take part."""
    present = regions.unique()
    logits = scale.exp() * patches @ captions[present].T + bias
    labels = 2.0 * (regions.unsqueeze(1) == present.unsqueeze(0)).float() - 1.0
    return -nn.functional.logsigmoid(labels * logits).sum() / patches.shape[0]


def region_accuracy(tower, head, encoder, pixels: torch.Tensor, regions: torch.Tensor) -> float:
    """Share of patches whose nearest region caption is their own (percent); regions (n, p)."""
    with torch.no_grad():
        patches = nn.functional.normalize(head(tower(pixel_values=pixels).last_hidden_state), dim=-1)
        nearest = (patches @ encoder().T).argmax(-1)
    return 100 * float((nearest == regions).float().mean())  # nearest: (n, p)


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


TOWER_KEYS = frozenset({"vision", "data", "scenes", "steps", "batch", "lr", "warmup", "seed"})


def load_stage_config(path, keys: frozenset, overrides: dict | None = None) -> dict:
    """A demo stage's YAML config with `overrides`; a missing or unknown key is one line naming the file."""
    config = {**yaml.safe_load(Path(path).read_text()), **(overrides or {})}
    unknown, missing = config.keys() - keys, keys - config.keys()
    if unknown or missing:
        raise ValueError(
            f"{path}: unknown key(s) {sorted(unknown)}, missing key(s) {sorted(missing)}; known: {sorted(keys)}"
        )
    return config


def load_config(path=CONFIG) -> dict:
    return load_stage_config(path, TOWER_KEYS)


def train_tower(config: dict, out: Path) -> dict:
    """Pre-train the tower of `config` and save it as a SigLIP vision folder at `out`; returns its record."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from aki.presets import TINY_VISION

    started = time.perf_counter()
    torch.manual_seed(config["seed"])
    tower = SiglipVisionModel(SiglipVisionConfig(**{**TINY_VISION, **config["vision"]}))
    width = tower.config.hidden_size
    head, encoder = nn.Linear(width, width), RegionCaptionEncoder(width)
    scale, bias = nn.Parameter(torch.tensor(math.log(10.0))), nn.Parameter(torch.tensor(-10.0))  # SigLIP's start
    parameters = [*tower.parameters(), *head.parameters(), *encoder.parameters(), scale, bias]
    optimizer = torch.optim.AdamW(parameters, lr=config["lr"], weight_decay=1e-4)
    steps, batch = config["steps"], config["batch"]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, steps, config["warmup"]))

    pixels, regions = scenes_and_regions(config["data"], config["scenes"], config["seed"])
    held_pixels, held_regions = scenes_and_regions(config["data"], 512, config["seed"] + 10_000)
    generator = torch.Generator().manual_seed(config["seed"])
    progress = tqdm(range(steps), desc="tower", unit="step")
    for _ in progress:
        index = torch.randint(len(pixels), (batch,), generator=generator)
        features = tower(pixel_values=pixels[index]).last_hidden_state  # (n, p, width)
        patches = nn.functional.normalize(head(features), dim=-1).flatten(0, 1)
        loss = sigmoid_loss(patches, encoder(), regions[index].flatten(), scale, bias)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        progress.set_postfix(loss=f"{loss.item():.3f}")
    tower.eval()
    accuracy = region_accuracy(tower, head, encoder, held_pixels, held_regions)
    out.mkdir(parents=True, exist_ok=True)
    tower.save_pretrained(out)
    record = {"config": config, "loss": loss.item(), "held_out_region_accuracy": accuracy}
    record["seconds"] = time.perf_counter() - started
    (out / "tower.json").write_text(json.dumps(record, indent=2))
    logger.info("tower: held-out patches name their region %.1f%% (%.0f s)", accuracy, record["seconds"])
    return record


def pretrained_tower(cache: Path, config_path=CONFIG) -> tuple[Path, dict]:
    """The cached tower for the config at `config_path` (trained on first use): its folder and record."""
    config = load_config(config_path)
    folder = Path(cache) / f"tower-{config_hash(config)}"
    if not (folder / "tower.json").is_file():
        train_tower(config, folder)
    return folder, json.loads((folder / "tower.json").read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".cache/aki_demo"), help="the cache folder")
    parser.add_argument("--config", type=Path, default=CONFIG)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    folder, record = pretrained_tower(args.out, args.config)
    print(f"{folder}: held-out region accuracy {record['held_out_region_accuracy']:.1f}%")


if __name__ == "__main__":
    main()
