"""Command-line tools fail with one line on stderr and exit code 2; `--debug` shows the traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

from aki.cli import main as aki_main
from aki.convert_official import main as convert_main
from aki_eval.run import main as eval_main
from aki_training.train import main as train_main

ROOT = Path(__file__).resolve().parent.parent


def one_line_error(capsys, command, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        command(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


def test_chat_with_a_missing_model_folder(tmp_path, capsys):
    line = one_line_error(capsys, aki_main, ["chat", "--model", str(tmp_path / "missing_dir"), "Hi?"])
    assert "missing_dir" in line and "Repo id" not in line


def test_convert_official_on_a_wrong_folder(tmp_path, capsys):
    line = one_line_error(capsys, convert_main, ["--checkpoint", str(tmp_path), "--out", str(tmp_path / "out")])
    assert str(tmp_path) in line


def test_eval_with_a_missing_model_folder(tmp_path, capsys):
    argv = ["--model", str(tmp_path / "nope"), "--benchmarks", "pope", "--data-root", str(tmp_path)]
    assert "nope" in one_line_error(capsys, eval_main, argv)


def test_train_with_a_mistyped_value(tmp_path, capsys):
    argv = ["--config", str(ROOT / "configs" / "tiny_sft.yaml"), "--set", "max_steps=abc"]
    assert "max_steps" in one_line_error(capsys, train_main, argv)


def test_debug_shows_the_traceback(tmp_path):
    command = [sys.executable, "-m", "aki.cli", "chat", "--model", str(tmp_path / "missing_dir"), "Hi?"]
    plain = subprocess.run(command, capture_output=True, text=True)
    assert plain.returncode == 2 and len(plain.stderr.strip().splitlines()) == 1, plain.stderr
    debug = subprocess.run([*command, "--debug"], capture_output=True, text=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "missing_dir" in debug.stderr
