"""The benchmarks of the paper's tables, by command-line name.

A benchmark defined elsewhere (the demo's `aki_demo.benchmark:Shapes`) is named by its import path,
`module:attribute`, where the attribute is a `Benchmark` subclass or instance.
"""

import pkgutil

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

BENCHMARKS: dict[str, Benchmark] = {
    benchmark.name: benchmark
    for benchmark in (
        MME(), MMBench(), SEEDBench(), LLaVABench(), MMMU(), MathVista(), POPE(), MMVet(), RealWorldQA(), CVBench(),
    )
}  # fmt: skip


def get_benchmark(name: str) -> Benchmark:
    """A benchmark of the paper by its name, or any other by its import path `module:attribute`."""
    if name in BENCHMARKS:
        return BENCHMARKS[name]
    if ":" not in name:
        raise ValueError(f"Unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}, or give module:Class.")
    try:
        found = pkgutil.resolve_name(name)
    except (ValueError, ImportError, AttributeError) as error:
        raise ValueError(f"Benchmark {name!r} cannot be imported: {error}.") from error
    benchmark = found() if isinstance(found, type) else found
    if not isinstance(benchmark, Benchmark):
        raise ValueError(f"{name!r} is a {type(benchmark).__name__}, not an aki_eval.benchmarks.Benchmark.")
    return benchmark


__all__ = ["BENCHMARKS", "NEEDS_JUDGE", "Benchmark", "Score", "get_benchmark"]
