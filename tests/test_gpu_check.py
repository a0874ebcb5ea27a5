"""benchmarks/gpu_check.sh: sized for the lent GPU machine (one call, 64 MiB carried, 8 files back, every
step under its own limit), and its dry run: every step, a step or two each, on this CPU."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def test_every_command_after_the_preparation_runs_as_a_step_with_a_limit():
    """A Python, pytest or benchmark command outside `--prepare` runs only through `step NAME SECONDS`."""
    lines = SCRIPT.read_text().splitlines()
    after_prepare = lines[next(i for i, line in enumerate(lines) if line.startswith("rm -rf")) :]
    for index, line in enumerate(after_prepare):
        if '"$PY"' not in line or line.lstrip().startswith("#"):
            continue
        continued = index > 0 and after_prepare[index - 1].rstrip().endswith("\\")
        assert continued or re.match(r'\s*step "[^"]+" \d+ ', line), line


def test_gpu_check_dry_run(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "AKI_GPU_WORK": str(tmp_path / "work")}
    prepared = subprocess.run(["bash", str(SCRIPT), "--prepare"], cwd=ROOT, env=env, capture_output=True, text=True)
    if prepared.returncode != 0:
        pytest.skip(f"gpu_check.sh --prepare could not fetch its wheels or SmolLM2: {prepared.stderr.strip()[-300:]}")
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    out = tmp_path / "out"
    returned = [path for path in out.rglob("*") if path.is_file()]
    assert len(returned) <= 8 and all(len(path.relative_to(out).parts) <= 3 for path in returned)
    assert sorted(path.name for path in returned) == [
        "attention.png",
        "gpu_check.log",
        "gpu_check.tar.gz",
        "summary.md",
    ]
    log = (out / "gpu_check.log").read_text()
    travelling = int(re.search(r"travelling: (\d+) MiB of 64", log).group(1))
    assert travelling < 64
    steps = re.findall(r"start (.+) \(limit", log)
    assert steps and all(f"done {step} in" in log for step in steps)
    planned, budget = map(int, re.search(r"limits (\d+)s of (\d+)s", log).groups())
    assert planned <= budget <= 9 * 60  # one device call of at most 9 minutes
    assert "| by shape |" in (out / "summary.md").read_text()
