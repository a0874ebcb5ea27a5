"""A non-editable install runs the commands from any folder: training, chat, evaluation and the demo.

The package is installed as a wheel would be (`pip install --target`, no dependencies, the venv's
setuptools) and each command runs from a folder outside the checkout, with only the installed
files on the path: a module or config found through the repository would fail here.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("aki", "aki_training", "aki_eval", "aki_demo")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("aki", "training", "eval", "demo"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path_factory.mktemp("site")
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps"]
    subprocess.run([*pip, "--no-build-isolation", "--target", str(target), str(source)], check=True)
    return target


def run(installed: Path, command: str, *args: str, cwd: Path) -> str:
    """Run an installed console script (through this interpreter) with only the install on the path."""
    environment = {**os.environ, "PYTHONPATH": str(installed)}
    done = subprocess.run(
        [sys.executable, str(installed / "bin" / command), *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, f"{command} {' '.join(args)} failed:\n{done.stderr[-3000:]}"
    return done.stdout


def test_the_install_holds_every_package_and_the_demo_configs(installed, tmp_path):
    code = (
        "import importlib, json; from aki_demo.run import CONFIGS; print(json.dumps({'configs': str(CONFIGS), "
        f"**{{name: importlib.import_module(name).__file__ for name in {PACKAGES!r}}}}}))"
    )
    environment = {**os.environ, "PYTHONPATH": str(installed)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=environment, capture_output=True, text=True)
    found = json.loads(done.stdout)
    assert all(Path(path).is_relative_to(installed) for path in found.values()), found
    assert sorted(path.name for path in Path(found["configs"]).glob("*.yaml")) == sorted(
        path.name for path in (ROOT / "demo" / "configs").glob("*.yaml")
    )


def test_installed_training_then_chat_then_evaluation(installed, tmp_path):
    config = ROOT / "configs" / "tiny_pretrain.yaml"  # a recipe is named explicitly, as a user names theirs
    settings = ["max_steps=2", "micro_batch_size=4", "save_every=0", f"output_dir={tmp_path / 'run'}"]
    run(installed, "aki-train", "--config", str(config), *[f"--set={pair}" for pair in settings], cwd=tmp_path)
    model = tmp_path / "run" / "final"
    assert json.loads((model / "config.json").read_text())["model_type"] == "aki"

    from PIL import Image

    Image.new("RGB", (32, 32), (220, 40, 40)).save(tmp_path / "red.png")
    answer = run(
        installed,
        "aki",
        "chat",
        "--model",
        str(model),
        "--image",
        "red.png",
        "--max-new-tokens",
        "3",
        "Hi?",
        cwd=tmp_path,
    )
    assert answer.strip()

    run(installed, "aki-eval", "--model", str(model), "--benchmarks", "aki_demo.benchmark:Shapes", "--limit", "4",
        "--output", "eval", cwd=tmp_path)  # fmt: skip
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert 0.0 <= results["shapes"]["columns"]["Shapes"] <= 100.0
    assert len((tmp_path / "eval" / "shapes" / "predictions.jsonl").read_text().splitlines()) == 4


def test_installed_quick_demo_produces_the_table_and_the_pictures(installed, tmp_path):
    out = tmp_path / "demo"
    run(installed, "aki-demo", "--quick", "--out", str(out), cwd=tmp_path)
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert set(summary) == {"causal", "mma", "gap"}
    for policy in ("causal", "mma"):
        assert 0.0 <= summary[policy]["mean"] <= 100.0
    assert summary["gap"]["seeds"] == [summary["mma"]["seeds"][0] - summary["causal"]["seeds"][0]]
    for name in ("accuracy.png", "mask_mma.png", "mask_causal.png", "attention_map.png", "results.md", "results.json"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "results.md").read_text()
    assert "| mma |" in report and "MMA - causal (same seed)" in report
    predictions = (out / "seed0" / "sft_mma" / "eval" / "shapes" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 24 and json.loads(predictions[0])["index"] == "0"
    # Each stage starts from the one before: language -> captions -> both SFT runs.
    for stage, parent in (("pretrain", "language"), ("sft_causal", "pretrain"), ("sft_mma", "pretrain")):
        config = yaml.safe_load((out / "seed0" / stage / "config.yaml").read_text())
        assert config["model"]["pretrained"] == str(out / "seed0" / parent / "final"), stage
