"""The benchmarks of the paper's tables, by command-line name."""

from .base import NEEDS_JUDGE, Benchmark, Score
from .cvbench import CVBench
from .llavabench import LLaVABench
from .mathvista import MathVista
from .mmbench import MMBench
from .mme import MME
from .mmmu import MMMU
from .mmvet import MMVet
from .pope import POPE
from .realworldqa import RealWorldQA
from .seedbench import SEEDBench
from .shapes import Shapes

BENCHMARKS: dict[str, Benchmark] = {
    benchmark.name: benchmark
    for benchmark in (
        MME(), MMBench(), SEEDBench(), LLaVABench(), MMMU(), MathVista(), POPE(), MMVet(), RealWorldQA(), CVBench(),
        Shapes(),
    )
}  # fmt: skip


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"Unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}.")
    return BENCHMARKS[name]


__all__ = ["BENCHMARKS", "NEEDS_JUDGE", "Benchmark", "Score", "get_benchmark"]
