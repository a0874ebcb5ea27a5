"""The `aki` model for lmms-eval, registered through its `lmms_eval.models` entry point.

    pip install "aki[lmms-eval]"    # with a CPU-only torch, as lmms-eval-cpu.txt says
    lmms-eval --model aki --model_args pretrained=DIR[,policy=mma,dtype=bfloat16] --tasks mme,pope --batch_size 8
    accelerate launch --num_processes 8 -m lmms_eval --model aki --model_args pretrained=DIR --tasks mme,pope

`--batch_size` is lmms-eval's own flag (it passes it to the model; `batch_size` inside `--model_args` would
be given twice). `auto` and `auto:N` take AUTO_BATCH_SIZE: the adapter does not probe memory.
Greedy unless `--gen_kwargs` sets `temperature` > 0 or `do_sample=True` (then `top_p` applies too); other
generation settings are ignored, with one warning. Under `accelerate launch` or `torchrun`, each process
takes its GPU (LOCAL_RANK) and its rank and world size; lmms-eval (0.7.3 from RANK and WORLD_SIZE itself)
gives it its share of questions.

A "simple" lmms-eval model: each request brings its text and the document's images; the first
image goes before the text as `<image>` (as AKI's VLMEvalKit wrapper does), later images are dropped.
"""

import logging

import torch
from lmms_eval.api.model import lmms
from tqdm import tqdm

from .run import Predictor

logger = logging.getLogger("aki.eval.lmms")
AUTO_BATCH_SIZE = 8
HONOURED = {"until", "max_new_tokens", "temperature", "do_sample", "top_p"}


def manifest():
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="aki", simple_class_path="aki_eval.lmms_eval_adapter.AkiLmms")


def cut_at(text: str, stops: list[str]) -> str:
    """The text up to the first stop string."""
    for stop in stops:
        if stop and stop in text:
            text = text.split(stop, 1)[0]
    return text


def batch_size_of(value: int | str) -> int:
    """lmms-eval's --batch_size: an integer, or `auto` / `auto:N` (AUTO_BATCH_SIZE here)."""
    if str(value).startswith("auto"):
        return AUTO_BATCH_SIZE
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"batch_size must be an integer, 'auto' or 'auto:N'; got {value!r}.") from None


def sampling_of(gen_kwargs: dict) -> dict:
    """The generate() settings for lmms-eval's gen_kwargs: greedy unless temperature > 0 or do_sample."""
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    if not (gen_kwargs.get("do_sample") or temperature > 0):
        return {"do_sample": False}
    sampling = {"do_sample": True, "temperature": temperature or 1.0}
    if gen_kwargs.get("top_p") is not None:
        sampling["top_p"] = float(gen_kwargs["top_p"])
    return sampling


class AkiLmms(lmms):
    is_simple = True

    def __init__(
        self,
        pretrained: str,
        policy: str | None = None,
        batch_size: int | str = 1,
        dtype: str = "float32",
        device: str | None = None,
        **kwargs,
    ):
        super().__init__()
        from accelerate import Accelerator

        # As lmms-eval's own models: one process per GPU, rank and world size from the launcher.
        self.accelerator = Accelerator()
        self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        if device is None and torch.cuda.is_available():
            device = f"cuda:{self.accelerator.local_process_index}"
        self.predictor = Predictor(pretrained, policy, dtype, device)
        self.batch_size = batch_size_of(batch_size)
        self.warned: set[str] = set()

    @property
    def device(self) -> torch.device:
        return self.predictor.device

    def warn_once(self, ignored: set[str]) -> None:
        new = ignored - self.warned
        if new:
            logger.warning("aki ignores the generation settings %s (it honours %s).", sorted(new), sorted(HONOURED))
            self.warned |= new

    def generate_until(self, requests) -> list[str]:
        answers = [None] * len(requests)
        # Requests with the same generation settings share batches.
        groups: dict[str, list[int]] = {}
        for position, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(position)
        progress = tqdm(total=len(requests), desc="aki", disable=self.rank != 0)
        for positions in groups.values():
            gen_kwargs = requests[positions[0]].args[1]
            self.warn_once(set(gen_kwargs) - HONOURED)
            max_new_tokens = int(gen_kwargs.get("max_new_tokens", 512))
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            for start in range(0, len(positions), self.batch_size):
                batch = positions[start : start + self.batch_size]
                contents, images = [], []
                for position in batch:
                    context, _, doc_to_visual, doc_id, task, split = requests[position].args
                    visuals = [v for v in doc_to_visual(self.task_dict[task][split][doc_id]) or [] if v is not None]
                    content = [{"type": "image"}] if visuals else []
                    contents.append(content + [{"type": "text", "text": context.replace("<image>", "").strip()}])
                    images += [visuals[0].convert("RGB")] if visuals else []
                texts = self.predictor.generate(contents, images, max_new_tokens, **sampling_of(gen_kwargs))
                for position, text in zip(batch, texts, strict=True):
                    answers[position] = cut_at(text, until)
                progress.update(len(batch))
        progress.close()
        return answers

    def loglikelihood(self, requests):
        raise NotImplementedError("The aki lmms-eval model generates; none of the paper's tasks needs log-likelihoods.")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("Multi-round generation is not supported by the aki lmms-eval model yet.")
