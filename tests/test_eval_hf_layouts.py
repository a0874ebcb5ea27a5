"""Hugging Face layouts as the hub holds them: unique record ids, multi-config snapshots, every benchmark that reads one."""

import pytest
from eval_fixtures import image_b64, write_tsv
from PIL import Image

from aki_eval.benchmarks import get_benchmark
from aki_eval.data import BenchmarkDataError
from aki_eval.run import parse_hf_configs

datasets = pytest.importorskip("datasets")


def pictures(n):
    return [Image.new("RGB", (16, 16), ("red", "blue", "green", "white")[i % 4]) for i in range(n)]


def as_dataset(rows: dict):
    dataset = datasets.Dataset.from_dict(rows)
    for column, values in rows.items():
        if values and isinstance(values[0], Image.Image):
            dataset = dataset.cast_column(column, datasets.Image())
    return dataset


def save_to_disk(folder, split, rows):
    datasets.DatasetDict({split: as_dataset(rows)}).save_to_disk(str(folder))


def test_pope_question_ids_restart_per_split_and_stay_apart(tmp_path):
    """lmms-lab/POPE numbers question_id from 1 in each split; keyed by it alone, predictions would overwrite."""
    categories = ["adversarial", "adversarial", "popular", "popular", "random", "random"]
    save_to_disk(tmp_path / "POPE", "test", {
        "id": [str(i) for i in range(6)], "question_id": ["1", "2"] * 3, "question": ["Is there a cat?"] * 6,
        "answer": ["yes", "no", "yes", "no", "no", "yes"], "image_source": ["x"] * 6, "image": pictures(6),
        "category": categories,
    })  # fmt: skip
    pope = get_benchmark("pope")
    records = pope.load(tmp_path)
    assert [r.index for r in records] == [f"{c}-{q}" for c, q in zip(categories, ["1", "2"] * 3, strict=True)]
    guesses = ["Yes", "Yes", "Yes", "No", "No", "No"]  # TP, FP, TP, TN, TN, FN
    score = pope.score(records, {r.index: g for r, g in zip(records, guesses, strict=True)})
    # P = 2/3, R = 2/3 over all six rows -> F1 = 66.7; with colliding ids only three rows would remain.
    assert score.metrics["rows"] == 6 and score.columns["POPE"] == pytest.approx(200 / 3)


def test_cvbench_idx_restarts_per_half(tmp_path):
    save_to_disk(tmp_path / "CV-Bench", "test", {
        "idx": [0, 1, 0], "type": ["2D", "2D", "3D"], "task": ["Count", "Count", "Depth"], "image": pictures(3),
        "question": ["How many?"] * 3, "choices": [["1", "2"]] * 3, "answer": ["(A)", "(B)", "(B)"],
        "prompt": [""] * 3, "source": ["COCO", "ADE20K", "Omni3D"],
    })  # fmt: skip
    assert [r.index for r in get_benchmark("cvbench").load(tmp_path)] == ["2D-0", "2D-1", "3D-0"]


def test_duplicate_record_ids_are_refused_at_load(tmp_path):
    rows = [
        {"index": 7, "image": image_b64(0), "question": "Is it red?", "answer": "Yes", "category": "random"},
        {"index": 7, "image": image_b64(1), "question": "Is it blue?", "answer": "No", "category": "random"},
    ]
    write_tsv(tmp_path / "POPE.tsv", rows)
    # A TSV is refused by its rows (eval.data.read_tsv); records from hub folders by their ids.
    with pytest.raises(BenchmarkDataError, match=r"POPE.tsv: index '7' is on rows 1 and 2"):
        get_benchmark("pope").load(tmp_path)


def test_duplicate_record_ids_in_a_hub_folder_are_refused_naming_the_records(tmp_path):
    save_to_disk(tmp_path / "POPE", "test", {
        "question_id": ["1", "2", "1"], "question": ["Is there a cat?"] * 3, "answer": ["yes", "no", "no"],
        "image_source": ["x"] * 3, "image": pictures(3), "category": ["random"] * 3,
    })  # fmt: skip
    with pytest.raises(BenchmarkDataError, match=r"POPE: record id 'random-1' is on records 1 and 3\. Give each"):
        get_benchmark("pope").load(tmp_path)


def mmbench_rows(language: str, n: int = 2) -> dict:
    return {
        "index": list(range(n)), "question": [f"{language}: which colour?"] * n, "hint": [None] * n,
        "answer": ["A"] * n, "A": ["red"] * n, "B": ["blue"] * n, "C": [None] * n, "D": [None] * n,
        "category": ["attribute_recognition"] * n, "image": pictures(n), "source": ["x"] * n,
        "L2-category": ["FP-S"] * n, "comment": [None] * n, "split": ["dev"] * n,
    }  # fmt: skip


def hub_snapshot_with_configs(folder):
    """A snapshot of lmms-lab/MMBench: parquet files per config, declared in the README's YAML header."""
    header = ["---", "configs:"]
    for config in ("cc", "cn", "en"):
        split = "test" if config == "cc" else "dev"
        (folder / config).mkdir(parents=True)
        as_dataset(mmbench_rows(config)).to_parquet(str(folder / config / f"{split}-00000-of-00001.parquet"))
        header += [f"- config_name: {config}", "  data_files:", f"  - split: {split}", f"    path: {config}/{split}-*"]
    (folder / "README.md").write_text("\n".join([*header, "---", "", "# MMBench"]) + "\n")


def test_mmbench_multi_config_snapshot_reads_en_or_the_chosen_config(tmp_path):
    hub_snapshot_with_configs(tmp_path / "MMBench")
    mmbench = get_benchmark("mmbench")
    records = mmbench.load(tmp_path)
    assert [r.extra["raw_question"] for r in records] == ["en: which colour?"] * 2
    assert records[0].options == {"A": "red", "B": "blue"}
    assert mmbench.load(tmp_path, parse_hf_configs("mmbench=cn")["mmbench"])[0].extra["raw_question"].startswith("cn")
    with pytest.raises(BenchmarkDataError, match=r"has no config 'fr'; configs: \['cc', 'cn', 'en'\]"):
        mmbench.load(tmp_path, "fr")
    with pytest.raises(ValueError, match="BENCHMARK=CONFIG"):
        parse_hf_configs("mmbench")


def test_a_multi_config_folder_without_a_choice_names_the_flag(tmp_path):
    hub_snapshot_with_configs(tmp_path / "MMVet")  # any benchmark without a default config
    with pytest.raises(BenchmarkDataError, match=r"holds configs \['cc', 'cn', 'en'\]; choose one \(--hf-config"):
        get_benchmark("mmvet").load(tmp_path)


class Grader:
    name = "stand-in"

    def ask(self, prompt, system=None, **kwargs):
        return "8 6" if system else "0.5"  # LLaVA-W: reference 8, ours 6; MM-Vet: 0.5


def test_judged_benchmarks_read_their_hub_layouts(tmp_path):
    save_to_disk(tmp_path / "MMVet", "test", {
        "question_id": ["v1", "v2"], "image": pictures(2), "question": ["What is it?"] * 2, "answer": ["cat"] * 2,
        "image_source": ["x"] * 2, "capability": [["rec"], ["rec", "ocr"]],
    })  # fmt: skip
    mmvet = get_benchmark("mmvet")
    records = mmvet.load(tmp_path)
    assert [(r.index, r.category) for r in records] == [("v1", "rec"), ("v2", "rec,ocr")]
    assert mmvet.score(records, {"v1": "a cat", "v2": "a dog"}, Grader()).columns == {"MM-Vet": 50.0}

    save_to_disk(tmp_path / "llava-bench-in-the-wild", "train", {
        "question_id": [0, 1], "question": ["Describe it."] * 2, "image": pictures(2), "caption": ["A cat."] * 2,
        "gpt_answer": ["A cat."] * 2, "category": ["detail", "conv"], "image_id": ["001", "002"],
    })  # fmt: skip
    llava = get_benchmark("llavabench")
    records = llava.load(tmp_path)
    assert [r.index for r in records] == ["0", "1"]
    assert llava.score(records, {"0": "a cat", "1": "a dog"}, Grader()).columns == {"LLaVA-W": 75.0}
