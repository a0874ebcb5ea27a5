"""Align a fresh connector to the language model's word embeddings before caption pre-training.

Caption pre-training alone left SmolLM2's image tokens unlike any word (cosine 0.1 with the
embeddings of the words they show; nearest words " Resonance", " and", " of"), and questions about
them stayed at chance: SmolLM2 binds words, and image tokens that live elsewhere give it nothing to
bind (docs/demo/experiments.md). So the connector first learns, alone, to put each cell's token
near the words that describe it, by FILIP's token-wise contrastive loss against SmolLM2's frozen
input embeddings of the caption words: a word's score is its best cosine among the scene's image
tokens, a caption's score the idf-weighted mean over its words (so "the", "in", "a", in every
caption, weigh nothing), and a symmetric InfoNCE runs over the scenes of a batch. The tower's
outputs are computed once, since the tower is frozen. The temperature is fixed: a learnt one
reached high retrieval with tokens that drifted away from every word (cosine 0.09).

Shapes: `n` scenes, `p` image tokens per scene, `w` words per caption, `d` the LM's width.

    python -m aki_demo.align --vision-model DIR --language-model DIR --out DIR
"""

import argparse
import json
import logging
import math
import re
import time
from importlib import resources
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .shapes import COLOURS, SHAPES, ShapesSource, draw_scene
from .tower import load_stage_config, pixel_values

logger = logging.getLogger("aki_demo.align")
CONFIG = resources.files("aki_demo") / "configs" / "demo_smollm2_align.yaml"


def caption_words(caption: str) -> list[str]:
    return re.findall(r"[a-z]+", caption.lower())


def inverse_document_frequency(captions: list[list[str]]) -> dict[str, float]:
    """log(n / captions holding the word): 0 for a word in every caption."""
    counts = {}
    for words in captions:
        for word in set(words):
            counts[word] = counts.get(word, 0) + 1
    return {word: math.log(len(captions) / count) for word, count in counts.items()}


def word_embeddings(words: list[str], tokenizer, embeddings: torch.Tensor) -> torch.Tensor:
    """Each word's input embedding as the LM reads it mid-sentence (" red"): the mean over its
    tokens; (len(words), d)."""
    rows = []
    for word in words:
        ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        rows.append(embeddings[ids].mean(0))
    return torch.stack(rows)


def late_interaction(tokens: torch.Tensor, words: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """FILIP's similarity of every scene with every caption: each caption word's best cosine among a
    scene's tokens, averaged with the words' weights. tokens (n, p, d), words (n, w, d), both unit
    length; weights (n, w), rows summing to 1 -> (n scenes, n captions)."""
    cosines = torch.einsum("ipd,jwd->ijpw", tokens, words)
    return (cosines.amax(dim=2) * weights.unsqueeze(0)).sum(-1)


def contrastive_loss(similarity: torch.Tensor, same_caption: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE over a batch; other scenes with the very same caption are not negatives."""
    logits = (similarity / temperature).masked_fill(same_caption & ~torch.eye(len(similarity), dtype=torch.bool), -1e4)
    target = torch.arange(len(similarity))
    return (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)) / 2


def nearest_word_accuracy(model, grid: int, image_size: int, tokenizer) -> dict[str, float]:
    """One shape alone in each cell, in each colour and shape: how often the cell's image token is
    nearer (cosine) to the right colour word than to the other colours, and likewise for shapes (percent)."""
    embeddings = model.get_input_embeddings().weight.detach()
    vocabularies = {"colour": list(COLOURS), "shape": list(SHAPES)}
    words = {
        kind: nn.functional.normalize(word_embeddings(v, tokenizer, embeddings), dim=-1)
        for kind, v in vocabularies.items()
    }
    scenes = [(c, s, cell) for c in COLOURS for s in SHAPES for cell in range(grid * grid)]
    pixels = pixel_values([draw_scene([o], image_size, grid) for o in scenes], image_size)
    with torch.no_grad():
        tokens = nn.functional.normalize(model.model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    hits = {"colour": 0, "shape": 0}
    for index, (colour, shape, cell) in enumerate(scenes):
        token = tokens[index, cell]
        hits["colour"] += vocabularies["colour"][int((words["colour"] @ token).argmax())] == colour
        hits["shape"] += vocabularies["shape"][int((words["shape"] @ token).argmax())] == shape
    return {kind: 100 * count / len(scenes) for kind, count in hits.items()}


def train_alignment(model, processor, config: dict) -> dict:
    """Train `model`'s connector alone (the tower and the LM stay as they are); returns the record."""
    torch.manual_seed(config["seed"])
    source = ShapesSource(config["scenes"], config["seed"], **config["data"])
    items = [source[index] for index in range(len(source))]
    captions = [caption_words(item["text"]) for item in items]
    idf = inverse_document_frequency(captions)
    vocabulary = sorted(idf)
    embeddings = model.get_input_embeddings().weight.detach()
    vocabulary_embeddings = nn.functional.normalize(
        word_embeddings(vocabulary, processor.tokenizer, embeddings), dim=-1
    )
    longest = max(len(words) for words in captions)
    word_ids = torch.zeros(len(captions), longest, dtype=torch.long)
    weights = torch.zeros(len(captions), longest)
    for row, words in enumerate(captions):
        word_ids[row, : len(words)] = torch.tensor([vocabulary.index(word) for word in words])
        weights[row, : len(words)] = torch.tensor([idf[word] for word in words])
    weights = weights / weights.sum(-1, keepdim=True)
    distinct_captions = {}
    caption_ids = torch.tensor([distinct_captions.setdefault(item["text"], len(distinct_captions)) for item in items])

    with torch.no_grad():  # the frozen tower's outputs, once
        pixels = pixel_values([item["image"] for item in items], source.image_size)
        features = torch.cat(
            [model.model.vision_tower(pixel_values=chunk).last_hidden_state for chunk in pixels.split(512)]
        )
    connector = model.model.connector
    optimizer = torch.optim.AdamW(connector.parameters(), lr=config["lr"], weight_decay=0.0)
    generator = torch.Generator().manual_seed(config["seed"])
    started, losses = time.perf_counter(), []
    progress = tqdm(range(config["steps"]), desc="align", unit="step")
    for _ in progress:
        batch = torch.randint(len(items), (config["batch"],), generator=generator)
        tokens = nn.functional.normalize(connector(features[batch]), dim=-1)
        similarity = late_interaction(tokens, vocabulary_embeddings[word_ids[batch]], weights[batch])
        same_caption = caption_ids[batch].unsqueeze(0) == caption_ids[batch].unsqueeze(1)
        loss = contrastive_loss(similarity, same_caption, config["temperature"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        progress.set_postfix(loss=f"{loss.item():.3f}")
    nearest = nearest_word_accuracy(model, source.grid, source.image_size, processor.tokenizer)
    logger.info("align: nearest colour word right %.1f%%, shape %.1f%%", nearest["colour"], nearest["shape"])
    return {"config": config, "loss": losses[-1], "seconds": time.perf_counter() - started, "nearest_word": nearest}


ALIGN_KEYS = frozenset({"connector", "data", "scenes", "steps", "batch", "lr", "temperature", "seed"})


def load_config(path=CONFIG, **overrides) -> dict:
    return load_stage_config(path, ALIGN_KEYS, overrides)


def aligned_model(vision_model: Path, language_model: Path, out: Path, config_path=CONFIG, **overrides) -> dict:
    """Assemble AKI from the two folders, align its connector and save it at `out` (with `align.json`)."""
    from aki.assemble import from_parts

    config = load_config(config_path, **overrides)
    torch.manual_seed(config["seed"])  # the connector's initialisation
    model, processor = from_parts(str(vision_model), str(language_model), **config["connector"])
    record = train_alignment(model, processor, config)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (Path(out) / "align.json").write_text(json.dumps(record, indent=2))
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vision-model", type=Path, required=True, help="a SigLIP vision folder (aki_demo.tower)")
    parser.add_argument("--language-model", type=Path, default=Path("checkpoints/SmolLM2-135M-Instruct"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, help="overrides the config's")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = {"steps": args.steps} if args.steps else {}
    record = aligned_model(args.vision_model, args.language_model, args.out, **overrides)
    print(json.dumps(record["nearest_word"]))


if __name__ == "__main__":
    main()
