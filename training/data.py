"""Training data: sources, the paper's SFT task templates, and a deterministic sharded stream.

Every sample has a global *position* in one stream that is a pure function of the seed. The
micro-batch `k` of rank `r` holds positions `(k * world + r) * micro_batch + i`, and dataloader
worker `w` builds micro-batches `start + w, start + w + workers, ...`. So ranks and workers never
share a sample, a run is the same whatever its worker count, and resuming at micro-batch `k`
replays exactly the batches an uninterrupted run would have seen.

For a mixture, position `p` picks its source with the configured weights (seeded per block of
positions) and walks that source through a fresh permutation per epoch, so a source's records
are not repeated before all of them have been used.
"""

import json
import pkgutil
import string
import tarfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from aki.processing_aki import load_image

from .config import DataSource
from .encode import SampleError, check_text, collate, encode_caption, encode_conversation, pack

BLOCK = 4096  # positions whose sources are drawn from one seeded generator

# The paper's SFT prompts (official templates.py), keyed by task.
VQA_PROMPT = "Answer the question using a single word or phrase. {question}"
OPTIONS_PROMPT = "Answer with the option's letter from the given choices directly. {question}\nOptions:\n{options}\n"
SCIENCEQA_PROMPT = (
    "Answer with the option's letter from the given choices directly. {question}\nContext: {context}\n"
    "Options:\n{options}\n"
)
VSR_PROMPT = "Answer the question using a single word or phrase. {question} Please answer yes or no."
REGION_PROMPT = "Provide a short description for this region. {bbox}"
TASKS = ("vqa", "gqa", "ocrvqa", "vsr", "aokvqa", "scienceqa", "refcoco", "refcoco+", "refcocog", "vg", "llava")


def open_image(value, image_root: str | None = None) -> Image.Image:
    """A path (relative to `image_root`), raw bytes, a `datasets` image dict or a PIL image -> 8-bit RGB PIL."""
    if isinstance(value, dict):  # datasets' undecoded Image feature
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (str, Path)):
        value = Path(image_root or "") / str(value)
        if not value.exists():
            raise SampleError("missing_image", str(value))
    try:
        return load_image(value)
    except ValueError as error:
        raise SampleError("bad_image", str(error)) from error


def expand_braces(pattern: str) -> list[str]:
    """`shards/{000..012}.tar` -> the 13 paths (webdataset's brace notation)."""
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


class WebDatasetSource:
    """Image-caption pairs in webdataset shards (`{000..N}.tar` with `.jpg`/`.png` and `.txt`), random access."""

    IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

    def __init__(self, pattern: str):
        self.samples: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
        for shard in expand_braces(pattern):
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            with tarfile.open(shard) as tar:
                for member in tar.getmembers():
                    if member.isfile() and "." in member.name:
                        key, extension = member.name.split(".", 1)
                        groups.setdefault(key, {})[extension.lower()] = member
            self.samples += [(shard, members) for _, members in sorted(groups.items())]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        shard, members = self.samples[index]
        image_member = next((members[e] for e in self.IMAGE_EXTENSIONS if e in members), None)
        if image_member is None:
            raise SampleError("missing_image", f"{shard}: no image for {sorted(members)}")
        with tarfile.open(shard) as tar:
            image = tar.extractfile(image_member).read()
            text = tar.extractfile(members["txt"]).read().decode("utf-8", "surrogateescape") if "txt" in members else ""
        return {"image": image, "text": text}


class HFDatasetSource:
    """Any `datasets` image-text dataset on disk: a `save_to_disk` folder, or files `load_dataset` reads."""

    def __init__(self, path: str, image_column: str, text_column: str):
        import datasets

        if (Path(path) / "state.json").exists() or (Path(path) / "dataset_dict.json").exists():
            dataset = datasets.load_from_disk(path)
        else:
            dataset = datasets.load_dataset(path)
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset["train"]
        if image_column in dataset.features and isinstance(dataset.features[image_column], datasets.Image):
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))  # decode in open_image
        self.dataset, self.image_column, self.text_column = dataset, image_column, text_column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        row = self.dataset[index]
        return {"image": row[self.image_column], "text": row[self.text_column]}


def read_records(path: str) -> list:
    """A JSON list or a JSON-lines file. Bytes that are not UTF-8 stay in their record (as lone
    surrogates) and a JSON-lines line that does not parse stays as a `MalformedLine`, so one bad
    record is skipped and counted when it is drawn instead of failing the whole file."""
    text = Path(path).read_bytes().decode("utf-8", errors="surrogateescape")
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                records.append(MalformedLine(f"{path} line {number}: {error}"))
    return records


class MalformedLine(str):
    """A JSON-lines line that does not parse; its text says where and why."""


def llava_messages(record: dict) -> tuple[list[dict], list[str]]:
    """A LLaVA record (`conversations` of human/gpt turns, `image` a path or list) -> messages, image paths.

    `<image>` markers in the text become image items where they stand; an image the text never
    marks goes before the first question, as LLaVA does. Multi-turn stays multi-turn. A record of
    another shape raises `SampleError("malformed_record")`.
    """
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise SampleError("malformed_record", f"no 'conversations' list in {keys}")
    images = record.get("image") or []
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list):
        raise SampleError("malformed_record", f"'image' is {type(images).__name__}, not a path or a list of paths")
    images = [check_text(image, "image") for image in images]
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    messages, marked = [], 0
    for turn in record["conversations"]:
        if not isinstance(turn, dict):
            raise SampleError("malformed_record", f"a turn is {type(turn).__name__}, not a mapping")
        role = roles.get(turn.get("from"))
        if role is None:
            raise SampleError("bad_conversation", f"unknown speaker {turn.get('from')!r}")
        value = check_text(turn.get("value") or "", "value")
        if role != "user":
            messages.append({"role": role, "content": value.strip()})
            continue
        content = []
        for piece_index, piece in enumerate(value.split("<image>")):
            if piece_index:
                content.append({"type": "image"})
                marked += 1
            piece = piece.strip("\n") if piece_index or "<image>" in value else piece
            if piece:
                content.append({"type": "text", "text": piece})
        messages.append({"role": "user", "content": content})
    if images and not marked:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is not None:
            first_user["content"] = [{"type": "image"} for _ in images] + first_user["content"]
    return messages, images


def lettered(options: list[str]) -> str:
    return "\n".join(f"{letter}. {option}" for letter, option in zip(string.ascii_uppercase, options, strict=False))


def bbox_text(bbox: list[float], width: float, height: float) -> str:
    """COCO [x, y, w, h] in pixels -> `<bbox>[x1, y1][x2, y2]</bbox>`, normalised, 3 decimals."""
    x, y, w, h = bbox
    x1, y1, x2, y2 = x / width, y / height, (x + w) / width, (y + h) / height
    return f"<bbox>[{x1:.3f}, {y1:.3f}][{x2:.3f}, {y2:.3f}]</bbox>"


def shuffled_options(record: dict, rng: np.random.Generator) -> tuple[str, str]:
    """Options in a fresh order per position (the answer letter follows its option)."""
    choices = list(record["choices"])
    answer = record["answer"]
    correct = choices[answer] if isinstance(answer, int) else answer
    if correct not in choices:
        raise SampleError("bad_record", f"answer {answer!r} not among the choices")
    order = rng.permutation(len(choices))
    options = [choices[i] for i in order]
    return lettered(options), string.ascii_uppercase[options.index(correct)]


def task_sample(task: str, record: dict, image_root: str | None, rng: np.random.Generator) -> tuple[list, list]:
    """A normalised task record -> (messages, images) through the paper's template for that task."""
    if task != "llava" and not isinstance(record, dict):
        raise SampleError("malformed_record", f"a record is {type(record).__name__}, not a mapping")
    try:
        return _task_sample(task, record, image_root, rng)
    except KeyError as error:
        raise SampleError("malformed_record", f"no field {error} in a {task} record") from error


def _task_sample(task: str, record: dict, image_root: str | None, rng: np.random.Generator) -> tuple[list, list]:
    if task == "llava":
        messages, paths = llava_messages(record)
        return messages, [open_image(path, image_root) for path in paths]
    images = [open_image(record["image"], image_root)] if record.get("image") else []
    if task in ("vqa", "gqa", "ocrvqa"):
        prompt, answer = VQA_PROMPT.format(question=record["question"]), str(record["answer"])
    elif task == "vsr":
        prompt, answer = VSR_PROMPT.format(question=record["question"]), str(record["answer"]).capitalize()
    elif task == "aokvqa":
        options, answer = shuffled_options(record, rng)
        prompt = OPTIONS_PROMPT.format(question=record["question"], options=options)
    elif task == "scienceqa":
        options, answer = shuffled_options(record, rng)
        context = record.get("hint") or record.get("context") or "N/A"
        prompt = SCIENCEQA_PROMPT.format(question=record["question"], context=context, options=options)
    elif task in ("refcoco", "refcoco+", "refcocog", "vg"):
        width, height = images[0].size
        prompt, answer = REGION_PROMPT.format(bbox=bbox_text(record["bbox"], width, height)), record["phrase"]
    else:
        raise ValueError(f"Unknown task {task!r}; choose one of {TASKS}.")
    content = [{"type": "image"}] * len(images) + [{"type": "text", "text": prompt}]
    return [{"role": "user", "content": content}, {"role": "assistant", "content": answer}], images


class RecordSource:
    """JSON / JSON-lines records: LLaVA conversations (`llava_json`) or one task of the paper's mixture."""

    def __init__(self, path: str, task: str, image_root: str | None):
        if task not in TASKS:
            raise ValueError(f"Unknown task {task!r}; choose one of {TASKS}.")
        self.records, self.task, self.image_root = read_records(path), task, image_root

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        if isinstance(record, MalformedLine):
            raise SampleError("malformed_record", record)
        return {"task": self.task, "record": record, "image_root": self.image_root}


def python_source(source: DataSource, stage: str, seed: int):
    """A source made by Python code named `module:callable` in `path` (the extension point for generated
    data, e.g. the demo's `aki_demo.shapes:ShapesSource`), called as `callable(size=, seed=, stage=, **options)`.
    It returns a sized, indexable dataset of the items the other sources give."""
    try:
        factory = pkgutil.resolve_name(source.path)
    except (ValueError, ImportError, AttributeError) as error:
        raise ValueError(
            f"Data source path {source.path!r} (kind python) does not name a callable: {error}. "
            "Write it as module:callable, with the module importable."
        ) from error
    return factory(size=source.size, seed=seed, stage=stage, **source.options)


def build_source(source: DataSource, stage: str, seed: int):
    if source.kind == "python":
        return python_source(source, stage, seed)
    if source.kind == "webdataset":
        return WebDatasetSource(source.path)
    if source.kind == "hf_dataset":
        return HFDatasetSource(source.path, source.image_column, source.text_column)
    if source.kind == "llava_json":
        return RecordSource(source.path, "llava", source.image_root)
    if source.kind == "task":
        return RecordSource(source.path, source.task or "", source.image_root)
    raise ValueError(f"Unknown data kind {source.kind!r}; use webdataset, hf_dataset, llava_json, task or python.")


class MixturePlan:
    """Which (source, record) sits at each stream position; a pure function of the seed."""

    def __init__(self, weights: list[float], sizes: list[int], seed: int):
        if any(size == 0 for size in sizes):
            raise ValueError(f"A data source is empty (sizes {sizes}).")
        total = float(sum(weights))
        self.probabilities = np.asarray(weights, dtype=np.float64) / total
        self.sizes, self.seed = sizes, seed
        self._sources: list[np.ndarray] = []  # per block: the source of each position
        self._counts: list[np.ndarray] = []  # per block: draws of each source before the block
        self._permutations: dict[tuple[int, int], np.ndarray] = {}

    def _extend(self, block: int) -> None:
        while len(self._sources) <= block:
            index = len(self._sources)
            before = self._counts[-1] + np.bincount(self._sources[-1], minlength=len(self.sizes)) if index else None
            rng = np.random.default_rng([self.seed, 1, index])
            self._sources.append(rng.choice(len(self.sizes), size=BLOCK, p=self.probabilities))
            self._counts.append(before if before is not None else np.zeros(len(self.sizes), dtype=np.int64))

    def __call__(self, position: int) -> tuple[int, int]:
        block, offset = divmod(position, BLOCK)
        self._extend(block)
        source = int(self._sources[block][offset])
        draw = int(self._counts[block][source] + np.count_nonzero(self._sources[block][:offset] == source))
        epoch, within = divmod(draw, self.sizes[source])
        return source, int(self._permutation(source, epoch)[within])

    def _permutation(self, source: int, epoch: int) -> np.ndarray:
        if (source, epoch) not in self._permutations:
            rng = np.random.default_rng([self.seed, 2, source, epoch])
            self._permutations[(source, epoch)] = rng.permutation(self.sizes[source])
        return self._permutations[(source, epoch)]


def micro_batch_positions(micro_step: int, rank: int, world_size: int, micro_batch_size: int) -> list[int]:
    first = (micro_step * world_size + rank) * micro_batch_size
    return list(range(first, first + micro_batch_size))


class TrainStream(IterableDataset):
    """Yields `{"micro_step", "batch", "skipped", "notes"}` for this rank, micro-batch by micro-batch."""

    def __init__(
        self,
        sources: list,
        weights: list[float],
        encode: Callable[[dict, int], object],
        micro_batch_size: int,
        pad_token_id: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_micro_step: int = 0,
        pack_to: int | None = None,
        pad_to_multiple_of: int = 1,
    ):
        self.sources, self.encode = sources, encode
        self.plan = MixturePlan(weights, [len(source) for source in sources], seed)
        self.micro_batch_size, self.pad_token_id = micro_batch_size, pad_token_id
        self.rank, self.world_size, self.start = rank, world_size, start_micro_step
        self.pack_to, self.pad_to_multiple_of = pack_to, pad_to_multiple_of

    def build(self, micro_step: int) -> dict:
        encoded, skipped, notes = [], Counter(), Counter()
        for position in micro_batch_positions(micro_step, self.rank, self.world_size, self.micro_batch_size):
            source, index = self.plan(position)
            try:
                sample = self.encode(self.sources[source][index], position)
            except SampleError as error:
                skipped[error.reason] += 1
                continue
            encoded.append(sample)
            notes.update(sample.notes)
        if not encoded:
            batch = None
        elif self.pack_to:
            batch = pack(encoded, self.pack_to, self.pad_token_id, self.pad_to_multiple_of)
        else:
            batch = collate(encoded, self.pad_token_id, self.pad_to_multiple_of)
        # Plain dicts: the DataLoader's `default_convert` copies a Counter and then `update()`s the
        # copy with its own items, which doubles every count.
        return {"micro_step": micro_step, "batch": batch, "skipped": dict(skipped), "notes": dict(notes)}

    def __iter__(self):
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        micro_step = self.start + worker_id
        while True:
            yield self.build(micro_step)
            micro_step += num_workers


def sample_encoder(stage: str, processor, max_length: int, seed: int) -> Callable[[dict, int], object]:
    """The function that turns a source item at a stream position into an encoded sample."""

    def encode(item: dict, position: int):
        if stage == "pretrain":
            return encode_caption(processor, open_image(item["image"]), item["text"], max_length)
        rng = np.random.default_rng([seed, 3, position])
        if "task" in item:
            messages, images = task_sample(item["task"], item["record"], item["image_root"], rng)
        else:  # an image-text item used for SFT: describe the image
            messages = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
                {"role": "assistant", "content": item["text"]},
            ]
            images = [open_image(item["image"])]
        return encode_conversation(processor, messages, images, max_length)

    return encode


def tokens_in(batch: dict | None) -> int:
    if batch is None:
        return 0
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def supervised_tokens(batch: dict | None) -> int:
    return 0 if batch is None else int((batch["labels"][:, 1:] != -100).sum())


__all__ = ["TrainStream", "MixturePlan", "build_source", "sample_encoder", "task_sample", "llava_messages"]
