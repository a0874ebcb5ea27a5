"""The demo's command (aki_demo.run): the paired-gap statistics, and a quick run around a pretrained LM.

The quick run of the tiny demo itself is in test_install.py, from a non-editable install.
"""

import json

import pytest


def test_the_gap_interval_is_students_t_over_the_paired_seeds():
    from aki_demo.run import paired_interval, summarise, verdict

    low, high = paired_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2 df) = 4.3027
    assert low == pytest.approx(2 - 4.3027 / 3**0.5, abs=1e-3) and high == pytest.approx(2 + 4.3027 / 3**0.5, abs=1e-3)
    assert paired_interval([4.0]) is None

    def said(causal, mma):
        per_seed = {seed: {"causal": c, "mma": m} for seed, (c, m) in enumerate(zip(causal, mma, strict=True))}
        return verdict(summarise(per_seed)["gap"])

    assert "above zero: MMA scores higher" in said([50, 60, 70], [55, 64, 76])
    assert "below zero: causal scores higher" in said([50, 60, 70], [45, 56, 64])
    assert "contains zero" in said([50, 60, 70], [55, 56, 71]) and "ahead in 2 of 3 seeds" in said(
        [50, 60, 70], [55, 56, 71]
    )
    assert said([50], [55]).startswith("One seed")


def test_quick_demo_around_a_pretrained_language_model(tmp_path):
    from helpers import save_tiny_qwen2

    from aki_demo.run import main

    tokenizer = save_tiny_qwen2(tmp_path / "qwen2")
    main(["--quick", "--out", str(tmp_path / "demo"), "--language-model", str(tmp_path / "qwen2")])
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["language_model"] == str(tmp_path / "qwen2") and set(results["per_seed"]["0"]) == {"causal", "mma"}
    export = tmp_path / "demo" / "seed0" / "sft_mma" / "final"
    config = json.loads((export / "config.json").read_text())
    assert config["text_config"]["model_type"] == "qwen2" and config["attention_policy"] == "mma"
    generation = json.loads((export / "generation_config.json").read_text())
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in generation["eos_token_id"]  # answers stop at ChatML's end
    predictions = (export.parent / "eval" / "shapes" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 24 and (tmp_path / "demo" / "accuracy.png").stat().st_size > 0
