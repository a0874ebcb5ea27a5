"""The figures the README, the model cards and the demo docs print are the generated files' own.

`docs/demo/results.md` is what `make demo` prints (`make demo-check`, run by CI, compares it with a
fresh run); `docs/demo/smollm2_ablation.json` is what `make ablation-smollm2` wrote.
"""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = ROOT / "docs" / "demo" / "smollm2_ablation.json"
FIGURE_KEYS = {"chance", "text_only", "causal", "mma", "gap", "gap_low", "gap_high", "seeds"}


@pytest.mark.parametrize("document", ["README.md", "docs/demo/README.md", "model_cards/aki-tiny-demo.md"])
def test_the_demo_results_are_printed_verbatim(document):
    results = (ROOT / "docs" / "demo" / "results.md").read_text().strip()
    assert results in (ROOT / document).read_text(), f"{document} must hold docs/demo/results.md as generated"


@pytest.mark.parametrize("document", ["README.md", "model_cards/aki-smollm2-demo.md", "docs/demo/experiments.md"])
def test_the_smollm2_table_is_made_from_its_json(document):
    from aki_demo.lm_ablation import readme_table

    table = readme_table(json.loads(PUBLISHED.read_text()))
    assert table in (ROOT / document).read_text(), f"{document} must hold readme_table(smollm2_ablation.json)"


def test_the_smollm2_ablation_meets_its_bar():
    published = json.loads(PUBLISHED.read_text())
    assert published.keys() == {"question_types", "minutes"} and published["minutes"] <= 150
    assert len(published["question_types"]) >= 2
    for kind, row in published["question_types"].items():
        assert row.keys() == FIGURE_KEYS, kind
        assert row["seeds"] >= 5, kind
        assert row["causal"] >= row["chance"] + 30, kind  # the model reads the image
        assert row["text_only"] <= row["chance"] + 10, kind  # the answers are not guessable from the text
        assert row["gap"] == pytest.approx(row["mma"] - row["causal"], abs=1e-6), kind
        assert row["gap_low"] <= row["gap"] <= row["gap_high"], kind
