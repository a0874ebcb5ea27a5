"""Every benchmark's metric against numbers computed by hand, from files in the real formats."""

import json

import pytest
from eval_fixtures import image_b64, write_tsv
from PIL import Image

from aki_eval.benchmarks import get_benchmark
from aki_eval.data import BenchmarkDataError
from aki_eval.extract import can_infer, strict_letter, yes_no


def predictions_for(records, answers: dict[str, str]) -> dict[str, str]:
    return {record.index: answers[record.index] for record in records}


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("Yes", "Yes"), ("yes.", "Yes"), ("No, there is not.", "No"), ("Yes and no", "Unknown"),
        ("I cannot tell", "Unknown"), ("NO", "No"), ("Yes, it is red.", "Yes"),
    ],
)  # fmt: skip
def test_yes_no_extraction(answer, expected):
    assert yes_no(answer) == expected


CHOICES = {"A": "a red square", "B": "a blue circle", "C": "a green triangle", "D": "nothing"}


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("B", "B"), ("(C)", "C"), ("The answer is B.", "B"), ("B. a blue circle", "B"), ("[D]", "D"),
        ("A blue circle", "A"),  # the article "A" stands alone: the toolkit's rule reads it as option A
        ("I think it is a green triangle", "C"), ("a red square or a blue circle", False),
        ("Cannot determine the answer", "Z"), ("", False), ("Z", "Z"), ("A or B", False),
    ],
)  # fmt: skip
def test_option_extraction(answer, expected):
    assert can_infer(answer, CHOICES) == expected


def test_cvbench_strict_letter():
    assert strict_letter("A", "(A)") and not strict_letter("A.", "(A)") and not strict_letter("(A)", "(A)")
    assert not strict_letter(" A", "(A)")


def mme_rows():
    # Two subtasks. existence: image 1 both right, image 2 one right -> acc 75, acc+ 50 -> 125.
    # code_reasoning: one image, both wrong -> 0.
    rows = []
    spec = [
        ("existence", "e1.jpg", "Is there a cat? Please answer yes or no.", "Yes", "Yes."),
        ("existence", "e1.jpg", "Is there a dog? Please answer yes or no.", "No", "No"),
        ("existence", "e2.jpg", "Is there a car? Please answer yes or no.", "Yes", "Yes"),
        ("existence", "e2.jpg", "Is there a bus? Please answer yes or no.", "No", "Yes"),
        ("code_reasoning", "c1.jpg", "Does it print 3? Please answer yes or no.", "Yes", "Maybe"),
        ("code_reasoning", "c1.jpg", "Does it print 4? Please answer yes or no.", "No", "Yes"),
    ]
    for index, (category, path, question, answer, _) in enumerate(spec):
        # The second question of an image points at the first row's image, as MME.tsv does.
        image = image_b64(index) if index % 2 == 0 else str(index - 1)
        rows.append(
            {
                "index": index,
                "image": image,
                "image_path": path,
                "question": question,
                "answer": answer,
                "category": category,
            }
        )
    return rows, {str(i): s[4] for i, s in enumerate(spec)}


def test_mme_acc_plus(tmp_path):
    rows, answers = mme_rows()
    write_tsv(tmp_path / "MME.tsv", rows)
    mme = get_benchmark("mme")
    records = mme.load(tmp_path)
    assert records[1].load_images()[0].size == (24, 24)  # the pointer resolved to row 0's image
    score = mme.score(records, predictions_for(records, answers))
    assert score.metrics["by_category"]["existence"] == {"acc": 75.0, "acc+": 50.0, "score": 125.0}
    assert score.columns == {"MME-P": 125.0, "MME-C": 0.0}


def circular_rows():
    """Two MMBench questions; question 0 has 2 rotations (both right), question 1 has 2 (one wrong)."""
    base = {"question": "What colour?", "hint": "", "category": "attribute_recognition", "l2-category": "FP-S"}
    return [
        {"index": 0, "image": image_b64(0), **base, "A": "red", "B": "blue", "answer": "A"},
        {"index": 1_000_000, "image": "0", **base, "A": "blue", "B": "red", "answer": "B"},
        {"index": 1, "image": image_b64(1), **base, "hint": "Look closely.", "A": "green", "B": "red", "answer": "A"},
        {"index": 1_000_001, "image": "1", **base, "A": "red", "B": "green", "answer": "B"},
    ]


def test_mmbench_circular(tmp_path):
    write_tsv(tmp_path / "MMBench_DEV_EN.tsv", circular_rows())
    mmbench = get_benchmark("mmbench")
    records = mmbench.load(tmp_path)
    assert records[2].question == (
        "Hint: Look closely.\nQuestion: What colour?\nOptions:\nA. green\nB. red\n"
        "Please select the correct answer from the options above. \n"
    )
    # Question 0: both rotations right. Question 1: the second rotation answers A (green), wrong.
    answers = {"0": "A", "1000000": "B. red", "1": "A", "1000001": "A"}
    score = mmbench.score(records, predictions_for(records, answers))
    assert score.columns == {"MMB": 50.0} and score.metrics["questions"] == 2


def test_pope_pooled_f1(tmp_path):
    rows = [
        {"index": 0, "image": image_b64(0), "question": "Is there a cat in the image?", "answer": "Yes", "category": "adversarial,popular,random"},
        {"index": 1, "image": image_b64(1), "question": "Is there a dog in the image?", "answer": "No", "category": "adversarial"},
        {"index": 2, "image": image_b64(2), "question": "Is there a car in the image?", "answer": "No", "category": "random"},
        {"index": 3, "image": image_b64(3), "question": "Is there a bus in the image?", "answer": "Yes", "category": "popular"},
    ]  # fmt: skip
    write_tsv(tmp_path / "POPE.tsv", rows)
    pope = get_benchmark("pope")
    records = pope.load(tmp_path)
    answers = {"0": "Yes", "1": "Yes, there is.", "2": "No.", "3": "I am not sure"}
    score = pope.score(records, predictions_for(records, answers))
    # Exploded rows: cat x3 (TP x3), dog (FP), car (TN), bus (FN: unknown) -> P = 3/4, R = 3/4, F1 = 75.
    assert score.metrics["rows"] == 6
    assert score.columns["POPE"] == pytest.approx(75.0)
    assert score.metrics["Overall"]["acc"] == pytest.approx(100 * 4 / 6)
    assert score.metrics["by_split"]["adversarial"]["F1"] == pytest.approx(100 * 2 * 0.5 * 1 / 1.5)


def test_seedbench_and_realworldqa(tmp_path):
    seed_rows = [
        {"index": i, "image": image_b64(i), "question": "Which?", "A": "x", "B": "y", "C": "z", "D": "w", "answer": "ABCD"[i], "category": "Scene Understanding"}
        for i in range(4)
    ]  # fmt: skip
    write_tsv(tmp_path / "SEEDBench_IMG.tsv", seed_rows)
    seed = get_benchmark("seedbench")
    records = seed.load(tmp_path)
    score = seed.score(records, predictions_for(records, {"0": "A", "1": "(B)", "2": "w", "3": "The answer is z"}))
    assert score.columns == {"SEED-I": 50.0}  # A and B right; "w" is D (wrong); "z" is C (wrong)

    rwqa_rows = [
        {"index": 0, "image": image_b64(0), "question": "How many cars?", "A": "1", "B": "2", "C": "3", "answer": "B"},
        {"index": 1, "image": image_b64(1), "question": "Is it safe?", "A": "Yes", "B": "No", "answer": "A"},
    ]
    write_tsv(tmp_path / "RealWorldQA.tsv", rwqa_rows)
    rwqa = get_benchmark("realworldqa")
    records = rwqa.load(tmp_path)
    assert rwqa.score(records, {"0": "B", "1": "B"}).columns == {"RWQA": 50.0}


def test_mmmu_open_questions_become_two_options(tmp_path):
    rows = [
        {"index": 0, "image": image_b64(0), "question": "<image 1> What is x?", "A": "1", "B": "2", "answer": "B", "split": "validation", "category": "Math"},
        {"index": 1, "image": image_b64(1), "question": "What is the speed in m/s? <image 1>", "answer": "3.5", "split": "validation", "category": "Physics"},
        {"index": 2, "image": image_b64(2), "question": "Name it.", "answer": "cat", "split": "dev", "category": "Bio"},
    ]  # fmt: skip
    write_tsv(tmp_path / "MMMU_DEV_VAL.tsv", rows)
    mmmu = get_benchmark("mmmu")
    records = mmmu.load(tmp_path)
    message = mmmu.message(records[0])
    assert [item["type"] for item in message] == ["text", "image", "text"]
    assert message[0]["value"] == "Question: "
    score = mmmu.score(records, {"0": "B", "1": "The speed is 3.5 m/s", "2": "a dog"})
    assert score.metrics["by_split"] == {"dev": 0.0, "validation": 100.0}
    assert score.columns == {"MMMU": 100.0}


def test_mmmu_multiple_choice_truth_that_is_no_option_letter_becomes_a(tmp_path):
    """VLMEvalKit's answer_map turns a non-letter truth into 'A' and keeps the options as they are."""
    rows = [
        {"index": 0, "image": image_b64(0), "question": "Pick one.", "A": "red", "B": "blue", "answer": "blue", "split": "validation", "category": "Art"},
    ]  # fmt: skip
    write_tsv(tmp_path / "MMMU_DEV_VAL.tsv", rows)
    mmmu = get_benchmark("mmmu")
    records = mmmu.load(tmp_path)
    assert mmmu.score(records, {"0": "A"}).columns == {"MMMU": 100.0}
    assert mmmu.score(records, {"0": "It is red"}).columns == {"MMMU": 100.0}  # option A's own text
    assert mmmu.score(records, {"0": "It is blue"}).columns == {"MMMU": 0.0}  # B's text: wrong, as in VLMEvalKit


def test_cvbench_source_macro_and_strict(tmp_path):
    def row(index, source, answer):
        return {
            "index": index,
            "image": image_b64(index),
            "question": "Which is closer?",
            "A": "lamp",
            "B": "bed",
            "answer": answer,
            "source": source,
        }

    rows_2d = [
        row(0, "ADE20K", "(A)"),
        row(1, "ADE20K", "(B)"),
        row(2, "COCO", "(A)"),
        row(3, "COCO", "(A)"),
        row(4, "COCO", "(B)"),
        row(5, "COCO", "(B)"),
    ]
    rows_3d = [row(0, "Omni3D", "(A)"), row(1, "Omni3D", "(B)")]
    write_tsv(tmp_path / "CV-Bench-2D.tsv", [{**r, "split": "2D"} for r in rows_2d])
    write_tsv(tmp_path / "CV-Bench-3D.tsv", [{**r, "split": "3D"} for r in rows_3d])
    cvbench = get_benchmark("cvbench")
    records = cvbench.load(tmp_path)
    answers = {
        "2D-0": "A",
        "2D-1": "A",
        "2D-2": "A",
        "2D-3": "A.",
        "2D-4": "B",
        "2D-5": "B",
        "3D-0": "(A)",
        "3D-1": "B",
    }
    score = cvbench.score(records, answers)
    # Strict: ADE20K 1/2 = 50, COCO 3/4 = 75 -> 2D = 62.5 (source macro); Omni3D 1/2 = 50.
    assert score.columns == {"CVB-2D": 62.5, "CVB-3D": 50.0}
    # With option extraction "A." and "(A)" count: COCO 100, Omni3D 100.
    assert score.metrics["option_extraction"]["2D"] == 75.0 and score.metrics["option_extraction"]["3D"] == 100.0


def test_hf_layout(tmp_path):
    datasets = pytest.importorskip("datasets")
    images = [Image.new("RGB", (20, 20), colour) for colour in ("red", "blue")]
    rows = {
        "question_id": ["a.jpg", "a.jpg"],
        "image": images,
        "question": ["Is it red? Please answer yes or no.", "Is it blue? Please answer yes or no."],
        "answer": ["Yes", "No"],
        "category": ["color", "color"],
    }
    dataset = datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())})
    dataset.save_to_disk(str(tmp_path / "MME"))
    mme = get_benchmark("mme")
    records = mme.load(tmp_path)
    assert len(records) == 2 and records[0].load_images()[0].size == (20, 20)
    score = mme.score(records, {"0": "yes", "1": "no"})
    assert score.metrics["by_category"]["color"]["score"] == 200.0


def test_missing_data_and_unknown_benchmarks_name_the_problem(tmp_path):
    with pytest.raises(BenchmarkDataError, match="No data for pope: looked for .*POPE.tsv"):
        get_benchmark("pope").load(tmp_path)
    with pytest.raises(ValueError, match="Unknown benchmark 'mmlu'"):
        get_benchmark("mmlu")
    with pytest.raises(ValueError, match="cannot be imported"):
        get_benchmark("aki_demo.benchmark:NoSuchBenchmark")
    with pytest.raises(ValueError, match="not an aki_eval.benchmarks.Benchmark"):
        get_benchmark("aki_demo.shapes:NUMBERS")
    write_tsv(tmp_path / "POPE.tsv", [{"index": 0, "image": image_b64(0), "question": "Is there a cat?"}])
    with pytest.raises(BenchmarkDataError, match="lacks the column 'answer'"):
        get_benchmark("pope").load(tmp_path)


def save_hf(tmp_path, folder, split, rows):
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_dict(rows)
    for column, values in rows.items():
        if values and isinstance(values[0], Image.Image):
            dataset = dataset.cast_column(column, datasets.Image())
    datasets.DatasetDict({split: dataset}).save_to_disk(str(tmp_path / folder))


def pictures(n):
    return [Image.new("RGB", (16, 16), ("red", "blue", "green", "white")[i % 4]) for i in range(n)]


def test_hf_layouts_of_the_other_benchmarks(tmp_path):
    save_hf(tmp_path, "CV-Bench", "test", {
        "idx": [0, 1, 2], "type": ["2D", "2D", "3D"], "task": ["Count", "Relation", "Depth"], "image": pictures(3),
        "question": ["How many?", "Left of?", "Closer?"], "choices": [["1", "2"], ["yes", "no"], ["lamp", "bed"]],
        "answer": ["(B)", "(A)", "(A)"], "prompt": ["", "", ""], "source": ["COCO", "ADE20K", "Omni3D"],
    })  # fmt: skip
    cvbench = get_benchmark("cvbench")
    records = cvbench.load(tmp_path)
    assert (
        records[0].question
        == "Answer with the option's letter from the given choices directly. How many?\nOptions:\nA. 1\nB. 2\n"
    )
    assert cvbench.score(records, {"0": "B", "1": "B", "2": "A"}).columns == {"CVB-2D": 50.0, "CVB-3D": 100.0}

    save_hf(tmp_path, "SEED-Bench", "test", {
        "question_id": ["q1", "q2", "v1"], "question": ["Which?"] * 3, "choice_a": ["a"] * 3, "choice_b": ["b"] * 3,
        "choice_c": ["c"] * 3, "choice_d": ["d"] * 3, "answer": ["A", "C", "B"], "data_type": ["image", "image", "video"],
        "question_type_id": [1, 9, 10], "image": [[p] for p in pictures(3)],
    })  # fmt: skip
    seed = get_benchmark("seedbench")
    records = seed.load(tmp_path)
    assert [r.index for r in records] == ["q1", "q2"] and records[1].category == "Text Understanding"
    assert seed.score(records, {"q1": "A", "q2": "D"}).columns == {"SEED-I": 50.0}

    save_hf(tmp_path, "RealWorldQA", "test", {
        "image": pictures(2),
        "question": [
            "How many lanes?\nA. 1\nB. 2\nC. 3\nPlease answer directly with only the letter of the correct option and nothing else.",
            "What colour is the light?\nPlease answer directly with a single word or number.",
        ],
        "answer": ["C", "Red"],
    })  # fmt: skip
    rwqa = get_benchmark("realworldqa")
    records = rwqa.load(tmp_path)
    assert (
        records[0].options == {"A": "1", "B": "2", "C": "3"} and records[0].extra["raw_question"] == "How many lanes?"
    )
    assert rwqa.score(records, {"0": "C", "1": "red."}).columns == {"RWQA": 100.0}

    save_hf(tmp_path, "MathVista", "testmini", {
        "pid": ["1", "2"], "query": ["How many?", "Which?"], "decoded_image": pictures(2), "choices": [None, ["3/11", "8/11"]],
        "answer": ["14", "8/11"], "question_type": ["free_form", "multi_choice"], "answer_type": ["integer", "text"],
        "metadata": [{"task": "math word problem", "skills": ["arithmetic reasoning"]}, {"task": "figure question answering", "skills": []}],
    })  # fmt: skip
    mathvista = get_benchmark("mathvista")
    records = mathvista.load(tmp_path)
    assert records[1].extra["answer_option"] == "B"
    score = mathvista.score(records, {"1": "14", "2": "B"})
    assert score.columns == {"MathV": "needs judge"}  # the toolkit requires a judge, even when the rules suffice
    assert score.metrics["rule-based lower bound (prefetch only, no judge)"] == 100.0

    save_hf(tmp_path, "MMMU", "validation", {
        "id": ["validation_Art_1", "dev_Art_2"], "question": ["<image 1> Which style?", "Who painted it?"],
        "options": ["['Baroque', 'Cubism']", "[]"], "image_1": pictures(2), "answer": ["B", "Picasso"],
        "question_type": ["multiple-choice", "open"], "subfield": ["Art", "Art"],
    })  # fmt: skip
    mmmu = get_benchmark("mmmu")
    records = mmmu.load(tmp_path)
    score = mmmu.score(records, {"validation_Art_1": "B", "dev_Art_2": "It was Picasso."})
    assert score.metrics["by_split"] == {"dev": 100.0, "validation": 100.0}


@pytest.mark.parametrize(
    "prediction, expected",
    [("14", True), ("14.0", False), ("14 cm", False), (" 14", True), ("The answer is 14", False)],
)
def test_mathvista_integer_prefetch_is_exact_like_the_toolkit(prediction, expected):
    """int() of the raw answer: units or a sentence need the judge (VLMEvalKit's post_check)."""
    from aki_eval.benchmarks.mathvista import check
    from aki_eval.data import Record

    record = Record("0", "How long?", "14", extra={"question_type": "free_form", "answer_type": "integer"})
    assert check(record, prediction) is expected


def test_a_benchmark_outside_aki_eval_is_named_by_its_import_path(tmp_path):
    from aki_demo.benchmark import Shapes

    shapes = get_benchmark("aki_demo.benchmark:Shapes")
    assert isinstance(shapes, Shapes) and shapes.name == "shapes"
    (tmp_path / "shapes.json").write_text(json.dumps({"grid": 3, "kinds": ["count_shape"]}))
    records = shapes.load(tmp_path)[:20]
    assert len(records) == 20 and all(r.question.endswith("s are there?") for r in records)
    predictions = {r.index: r.answer if int(r.index) % 2 else "wrong" for r in records}
    assert shapes.score(records, predictions).columns == {"Shapes": 50.0}
