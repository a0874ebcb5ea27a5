"""MM-Vet: a judge grades each answer against the ground truth from 0.0 to 1.0 with the MM-Vet few-shot prompt.

The overall score is VLMEvalKit's. The per-capability scores are not, on purpose: VLMEvalKit (6c85ef78,
`MMVet_acc`) adds a question with a single capability, say `rec`, to `rec` twice, once as the capability
and once as the one-capability combination, so its `rec` leans towards single-capability questions.
Here each question counts once per capability it has; `by_combination` holds the combinations apart.
"""

from collections import defaultdict

from ..data import Record
from .base import NEEDS_JUDGE, Benchmark, Score, mean

CAPABILITIES = ("rec", "ocr", "know", "gen", "spat", "math")
PROMPT = """
Compare the ground truth and prediction from AI models, to give a correctness score for the prediction.
<AND> in the ground truth means it is totally right
only when all elements in the ground truth are present in the prediction,
and <OR> means it is totally right when any one element in the ground truth is present in the prediction.
The correctness score is 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, or 1.0 (totally right).
Just complete the last space of the correctness score.

Question | Ground truth | Prediction | Correctness
--- | --- | --- | ---
What is x in the equation? | -1 <AND> -5 | x = 3 | 0.0
What is x in the equation? | -1 <AND> -5 | x = -1 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 or 5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -1 or x = -5 | 1.0
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries
Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes,
while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues
because the names of these countries do not accurately represent their landscapes. |
The meme talks about Iceland and Greenland. It's pointing out that despite their names,
Iceland is not very icy and Greenland isn't very green. | 0.4
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries
Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes,
while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues
because the names of these countries do not accurately represent their landscapes. |
The meme is using humor to point out the misleading nature of Iceland's and Greenland's names.
Iceland, despite its name, has lush green landscapes while Greenland is mostly covered in ice and snow.
The text 'This is why I have trust issues' is a playful way to suggest
that these contradictions can lead to distrust or confusion.
The humor in this meme is derived from the unexpected contrast between the names of the countries
and their actual physical characteristics. | 1.0
"""


def judge_prompt(question: str, truth: str, prediction: str) -> str:
    truth = truth.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    return PROMPT + "\n" + " | ".join([question, truth, prediction, ""])


def grade(judge, prompt: str) -> float:
    """A score in [0, 1]: 5 tries at temperature 0, 0.5, 1, ...; 0.0 if none parses."""
    for attempt in range(5):
        try:
            value = float(judge.ask(prompt, temperature=0.5 * attempt, max_tokens=3))
        except ValueError:
            continue
        if 0.0 <= value <= 1.0:
            return value
    return 0.0


class MMVet(Benchmark):
    name = "mmvet"
    columns = ("MM-Vet",)
    tsv_names = ("MMVet.tsv",)
    hf_dirs = ("MMVet",)
    hf_split = "test"

    def from_tsv(self, row: dict) -> list[Record]:
        return [
            Record(str(row["index"]), row["question"], str(row["answer"]), row["_images"], category=row["category"])
        ]

    def from_hf(self, row: dict) -> list[Record]:
        capability = row["capability"]
        category = ",".join(capability) if isinstance(capability, list) else str(capability)
        return [Record(str(row["question_id"]), row["question"], str(row["answer"]), [row["image"]], category=category)]

    def score_read_back(self, records, predictions, judge=None) -> Score:
        if judge is None:
            return Score(columns=dict.fromkeys(self.columns, NEEDS_JUDGE), notes=["no judge configured"])
        grades = {r.index: grade(judge, judge_prompt(r.question, r.answer, predictions[r.index])) for r in records}
        by_capability, by_combination = defaultdict(list), defaultdict(list)
        for record in records:
            for capability in CAPABILITIES:
                if capability in record.category:
                    by_capability[capability].append(grades[record.index])
            by_combination[record.category.replace(",", "_")].append(grades[record.index])
        overall = 100 * mean(grades.values())
        return Score(
            columns={"MM-Vet": overall},
            metrics={
                "Overall": overall,
                "by_capability": {k: 100 * mean(v) for k, v in by_capability.items()},
                "by_combination": {k: 100 * mean(v) for k, v in by_combination.items()},
            },
            judge=judge.name,
        )
