"""benchmarks/gpu_check.sh --dry-run: every step of the GPU check, a step or two each, on this CPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def test_gpu_check_dry_run(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "AKI_GPU_WORK": str(tmp_path / "work")}
    prepared = subprocess.run(["bash", str(SCRIPT), "--prepare"], cwd=ROOT, env=env, capture_output=True, text=True)
    if prepared.returncode != 0:
        pytest.skip(f"gpu_check.sh --prepare could not fetch its wheels or SmolLM2: {prepared.stderr.strip()[-300:]}")
    if not (ROOT / ".venv-vllm" / "bin" / "python").exists():
        pytest.skip("the dry run's vLLM steps need .venv-vllm: run `make vllm` (make test does)")
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "accuracy.png",
        "attention.png",
        "gpu_check.log",
        "gpu_check.tar.gz",
        "summary.md",
    ]
    log = (out / "gpu_check.log").read_text()
    steps = ("install wheels", "environment", "CUDA tests", "bench_attention", "bench_train", "SmolLM2 ablation")
    for step in (*steps, "vLLM tests", "vLLM serving"):
        assert f"done {step}" in log
    summary = (out / "summary.md").read_text()
    assert "| MMA - causal (same seed) |" in summary
    assert "| 1 | vllm serve |" in summary
