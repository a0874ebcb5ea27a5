"""A stand-in for the parts of lmms-eval the `aki` adapter touches (lmms-eval itself pulls a CUDA torch).

`install()` puts `lmms_eval.api.model.lmms` (rank and world size as its base class keeps them) and
`lmms_eval.models.registry_v2.ModelManifest` into `sys.modules`. Run as a script under
`torch.distributed.run`, it is one rank of an lmms-eval run: it takes its share of the documents the way
lmms-eval's `build_all_requests` does (`islice(docs, rank, None, world_size)`) and writes its answers.
"""

import itertools
import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path


class LMMs:
    """lmms_eval.api.model.lmms: a single process unless the model says otherwise."""

    def __init__(self):
        self._rank, self._world_size = 0, 1

    @property
    def rank(self):
        return self._rank

    @property
    def world_size(self):
        return self._world_size


@dataclass(frozen=True)
class ModelManifest:
    model_id: str
    simple_class_path: str | None = None


@dataclass
class Instance:
    args: tuple


def install(modules: dict | None = None) -> dict:
    """The stand-in modules, put into `modules` (sys.modules by default, or a monkeypatch's dict)."""
    stand_ins = {
        name: types.ModuleType(name)
        for name in ("lmms_eval", "lmms_eval.api", "lmms_eval.api.model", "lmms_eval.models", "lmms_eval.models.registry_v2")
    }  # fmt: skip
    stand_ins["lmms_eval.api.model"].lmms = LMMs
    stand_ins["lmms_eval.models.registry_v2"].ModelManifest = ModelManifest
    (sys.modules if modules is None else modules).update(stand_ins)
    return stand_ins


def questions(n: int) -> tuple[dict, list]:
    """n documents (a coloured square each) and their lmms-eval generation requests."""
    from PIL import Image

    docs = {i: {"image": Image.new("RGB", (32, 32), ("red", "green", "blue")[i % 3])} for i in range(n)}
    requests = [
        Instance(
            (f"Question {i}?", {"max_new_tokens": 4, "until": ["\n\n"]}, lambda d: [d["image"]], i, "pope", "test")
        )
        for i in range(n)
    ]
    return docs, requests


def main(checkpoint: str, output: Path, n: int) -> None:
    install()
    from aki_eval.lmms_eval_adapter import AkiLmms

    model = AkiLmms(pretrained=checkpoint, batch_size="auto")
    docs, requests = questions(n)
    model.task_dict = {"pope": {"test": docs}}
    mine = list(itertools.islice(requests, model.rank, None, model.world_size))
    answers = model.generate_until(mine)
    result = {
        "rank": model.rank,
        "world_size": model.world_size,
        "answers": {r.args[3]: a for r, a in zip(mine, answers, strict=True)},
    }
    (output / f"rank{model.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]))
