"""Data: mixture proportions, sharding across ranks and workers, readers, templates, bad samples."""

import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
from helpers import supervised_text
from PIL import Image
from torch.utils.data import DataLoader

from aki_demo.shapes import write_llava_json, write_webdataset
from aki_training.config import DataSource
from aki_training.data import (
    MixturePlan,
    TrainStream,
    bbox_text,
    build_source,
    llava_messages,
    sample_encoder,
    task_sample,
)
from aki_training.encode import Encoded, SampleError


def test_mixture_follows_the_weights():
    weights, sizes = [0.5, 0.3, 0.15, 0.05], [1000, 700, 300, 50]
    plan = MixturePlan(weights, sizes, seed=1)
    n = 20000
    counts = Counter(plan(p)[0] for p in range(n))
    for source, weight in enumerate(weights):
        sigma = (n * weight * (1 - weight)) ** 0.5
        assert abs(counts[source] - n * weight) < 4 * sigma, (source, counts[source])


def test_each_source_is_exhausted_before_it_repeats():
    plan = MixturePlan([0.7, 0.3], [100, 40], seed=3)
    drawn = {0: [], 1: []}
    for position in range(300):
        source, index = plan(position)
        drawn[source].append(index)
    for source, size in ((0, 100), (1, 40)):
        first_epoch = drawn[source][:size]
        assert sorted(first_epoch) == list(range(size))


def test_plan_is_deterministic_and_order_free():
    a, b = MixturePlan([0.6, 0.4], [10, 10], seed=5), MixturePlan([0.6, 0.4], [10, 10], seed=5)
    positions = [9000, 3, 4096, 17]
    in_given_order = {p: a(p) for p in positions}
    in_sorted_order = {p: b(p) for p in sorted(positions)}
    assert in_given_order == in_sorted_order
    assert [a(p) for p in range(50)] != [MixturePlan([0.6, 0.4], [10, 10], seed=6)(p) for p in range(50)]


class IdentitySource(list):
    pass


def identity_encode(item, position):
    return Encoded(input_ids=[item["source"] * 10000 + item["index"]], labels=[0], pixel_values=None)


def stream_ids(rank, world_size, workers, steps, micro_batch_size=4, start=0):
    sources = [IdentitySource({"source": s, "index": i} for i in range(500)) for s in range(2)]
    stream = TrainStream(sources, [0.5, 0.5], identity_encode, micro_batch_size, 0, 7, rank, world_size, start)
    loader = iter(DataLoader(stream, batch_size=None, num_workers=workers))
    batches = [next(loader) for _ in range(steps)]
    return [(b["micro_step"], b["batch"]["input_ids"][:, 0].tolist()) for b in batches]


def test_two_ranks_two_workers_share_nothing_and_cover_the_stream():
    per_rank = [stream_ids(rank, 2, workers=2, steps=10) for rank in range(2)]
    for batches in per_rank:
        assert [micro_step for micro_step, _ in batches] == list(range(10))  # in order despite two workers
    ids = [i for batches in per_rank for _, row in batches for i in row]
    assert len(ids) == len(set(ids)) == 2 * 10 * 4
    plan = MixturePlan([0.5, 0.5], [500, 500], seed=7)
    expected = {s * 10000 + i for s, i in (plan(p) for p in range(80))}
    assert set(ids) == expected


def test_worker_count_does_not_change_the_batches():
    assert stream_ids(0, 1, workers=0, steps=6) == stream_ids(0, 1, workers=2, steps=6)


def test_resume_replays_the_same_batches():
    assert stream_ids(1, 2, workers=2, steps=8)[3:] == stream_ids(1, 2, workers=2, steps=5, start=3)


def test_webdataset_reader(tmp_path, tiny):
    _, processor = tiny
    pattern = write_webdataset(tmp_path / "shards", shards=2, per_shard=3)
    source = build_source(DataSource(kind="webdataset", path=pattern), "pretrain", 0)
    assert len(source) == 6
    item = source[4]
    assert Image.open(io.BytesIO(item["image"])).size == (32, 32) and item["text"].endswith(".")
    encoded = sample_encoder("pretrain", processor, 128, 0)(item, 0)
    assert encoded.pixel_values.shape == (1, 3, 32, 32)


def test_hf_dataset_reader(tmp_path, tiny):
    datasets = pytest.importorskip("datasets")
    _, processor = tiny
    images = [Image.new("RGB", (20, 20), colour) for colour in ("red", "blue")]
    dataset = datasets.Dataset.from_dict({"image": images, "caption": ["A red image.", "A blue image."]})
    dataset = dataset.cast_column("image", datasets.Image())
    dataset.save_to_disk(str(tmp_path / "hf"))
    source = build_source(
        DataSource(kind="hf_dataset", path=str(tmp_path / "hf"), text_column="caption"), "pretrain", 0
    )
    assert len(source) == 2
    encoded = sample_encoder("pretrain", processor, 128, 0)(source[1], 0)
    assert supervised_text(processor, encoded).startswith("A blue image.")


def test_llava_json_keeps_multi_turn(tmp_path, tiny):
    model, processor = tiny
    path = write_llava_json(tmp_path / "llava", size=3)
    source = build_source(DataSource(kind="llava_json", path=str(path), image_root=str(tmp_path / "llava")), "sft", 0)
    encoded = sample_encoder("sft", processor, 512, 0)(source[0], 0)
    assert supervised_text(processor, encoded).count("<|endoftext|>") == 2  # both answers


def test_llava_messages_place_images_where_marked():
    record = {
        "image": "a.jpg",
        "conversations": [{"from": "human", "value": "Look: <image>\nWhat?"}, {"from": "gpt", "value": "A cat."}],
    }
    messages, images = llava_messages(record)
    assert images == ["a.jpg"]
    assert messages[0]["content"] == [
        {"type": "text", "text": "Look: "},
        {"type": "image"},
        {"type": "text", "text": "What?"},
    ]
    unmarked = {
        "image": "a.jpg",
        "conversations": [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "A cat."}],
    }
    assert llava_messages(unmarked)[0][0]["content"][0] == {"type": "image"}


def test_task_templates():
    image = Image.new("RGB", (200, 100))
    rng = np.random.default_rng(0)
    messages, _ = task_sample("vqa", {"image": image, "question": "What is it?", "answer": "cat"}, None, rng)
    assert messages[0]["content"][-1]["text"] == "Answer the question using a single word or phrase. What is it?"
    assert messages[1]["content"] == "cat"
    record = {"image": image, "question": "Which?", "choices": ["cat", "dog", "cow"], "answer": 1}
    for seed in range(5):
        messages, _ = task_sample("aokvqa", record, None, np.random.default_rng(seed))
        prompt, letter = messages[0]["content"][-1]["text"], messages[1]["content"]
        assert prompt.startswith("Answer with the option's letter from the given choices directly. Which?\nOptions:\n")
        assert f"{letter}. dog" in prompt  # the letter follows the shuffled option
    messages, _ = task_sample("refcoco", {"image": image, "bbox": [20, 10, 100, 50], "phrase": "left cat"}, None, rng)
    assert messages[0]["content"][-1]["text"] == (
        "Provide a short description for this region. <bbox>[0.100, 0.100][0.600, 0.600]</bbox>"
    )
    assert bbox_text([0, 0, 200, 100], 200, 100) == "<bbox>[0.000, 0.000][1.000, 1.000]</bbox>"
    messages, _ = task_sample(
        "vsr", {"image": image, "question": "Is the cat left of the dog?", "answer": "yes"}, None, rng
    )
    assert messages[0]["content"][-1]["text"].endswith("Is the cat left of the dog? Please answer yes or no.")
    assert messages[1]["content"] == "Yes"


def test_corrupt_images_and_empty_captions_are_skipped_and_counted(tmp_path, tiny):
    _, processor = tiny
    shard = tmp_path / "bad.tar"
    good = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(good, format="JPEG")
    members = [
        ("0.jpg", good.getvalue()), ("0.txt", b"A red square."),
        ("1.jpg", b"\xff\xd8\xff garbage"), ("1.txt", b"A broken image."),
        ("2.jpg", good.getvalue()), ("2.txt", b"   "),
        ("3.txt", b"An image that is missing."),
    ]  # fmt: skip
    with tarfile.open(shard, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    source = build_source(DataSource(kind="webdataset", path=str(shard)), "pretrain", 0)
    stream = TrainStream([source], [1.0], sample_encoder("pretrain", processor, 128, 0), 4, 2, seed=0)
    item = stream.build(0)
    assert item["skipped"] == {"bad_image": 1, "empty_caption": 1, "missing_image": 1}
    assert item["batch"]["input_ids"].shape[0] == 1
    with pytest.raises(SampleError):
        sample_encoder("pretrain", processor, 128, 0)(source[1], 0)
    assert json.dumps(dict(item["skipped"]))


def test_every_config_loads_and_unknown_keys_are_refused():
    from pathlib import Path

    from aki_demo import align, tower
    from aki_training.config import load_config

    repository = Path(__file__).resolve().parent.parent
    root = repository / "configs"
    stages = {"demo_smollm2_tower": tower.load_config, "demo_smollm2_align": align.load_config}  # not training runs
    paths = [*root.glob("*.yaml"), *(repository / "demo" / "configs").glob("*.yaml")]
    configs = {path.stem: load_config(path) for path in paths if path.stem not in stages}
    for name, load_stage in stages.items():
        assert load_stage(repository / "demo" / "configs" / f"{name}.yaml")["steps"] > 0
    with pytest.raises(ValueError, match=r"demo_smollm2_align.yaml: unknown key\(s\) \['stepz'\]"):
        align.load_config(repository / "demo" / "configs" / "demo_smollm2_align.yaml", stepz=3)
    assert {"tiny_pretrain", "tiny_sft", "aki4b_pretrain", "aki4b_sft", "demo_sft"} <= configs.keys()
    for name, config in configs.items():  # every generated source is importable and gives items
        for source in (s for s in config.data if s.kind == "python"):
            assert len(build_source(source, config.stage, 0)) == source.size, name
    sft = configs["aki4b_sft"]
    weights = {source.task or source.kind: source.weight for source in sft.data}
    assert abs(sum(weights.values()) - 1.0) < 1e-6  # the paper's mixture, as shares of one
    with pytest.raises(ValueError, match="Unknown key.*lrr"):
        load_config(root / "tiny_sft.yaml", {"optim.lrr": 1.0})
    with pytest.raises(ValueError, match="stage"):
        load_config(root / "tiny_sft.yaml", {"stage": "rlhf"})


def test_a_python_source_is_named_by_its_import_path():
    from aki_demo.shapes import ShapesSource

    source = build_source(DataSource(kind="python", path="aki_demo.shapes:ShapesSource", size=5), "sft", 3)
    assert isinstance(source, ShapesSource) and len(source) == 5 and source.seed == 3 and source.stage == "sft"
    with pytest.raises(ValueError, match="module:callable"):
        build_source(DataSource(kind="python", path="aki_demo.shapes:NoSuchSource"), "sft", 0)
