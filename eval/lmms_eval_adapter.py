"""The `aki` model for lmms-eval, registered through its `lmms_eval.models` entry point.

    pip install "aki[lmms-eval]"
    lmms-eval --model aki --model_args pretrained=DIR[,policy=mma,batch_size=8,dtype=bfloat16] --tasks mme,pope

A "simple" lmms-eval model: each request brings its text and the document's images; the first
image goes before the text as `<image>` (as AKI's VLMEvalKit wrapper does), later images are dropped.
"""

from lmms_eval.api.model import lmms
from tqdm import tqdm

from .run import Predictor


def manifest():
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="aki", simple_class_path="aki_eval.lmms_eval_adapter.AkiLmms")


def cut_at(text: str, stops: list[str]) -> str:
    """The text up to the first stop string."""
    for stop in stops:
        if stop and stop in text:
            text = text.split(stop, 1)[0]
    return text


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
        self.predictor = Predictor(pretrained, policy, dtype, device)
        self.batch_size = int(batch_size)

    def generate_until(self, requests) -> list[str]:
        answers = [None] * len(requests)
        # Requests with the same generation settings share batches.
        groups: dict[str, list[int]] = {}
        for position, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(position)
        progress = tqdm(total=len(requests), desc="aki", disable=getattr(self, "rank", 0) != 0)
        for positions in groups.values():
            for start in range(0, len(positions), self.batch_size):
                batch = positions[start : start + self.batch_size]
                contents, images = [], []
                for position in batch:
                    context, _, doc_to_visual, doc_id, task, split = requests[position].args
                    visuals = [v for v in doc_to_visual(self.task_dict[task][split][doc_id]) or [] if v is not None]
                    content = [{"type": "image"}] if visuals else []
                    contents.append(content + [{"type": "text", "text": context.replace("<image>", "").strip()}])
                    images += [visuals[0].convert("RGB")] if visuals else []
                gen_kwargs = requests[batch[0]].args[1]
                max_new_tokens = int(gen_kwargs.get("max_new_tokens", 512))
                until = gen_kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                for position, text in zip(
                    batch, self.predictor.generate(contents, images, max_new_tokens), strict=True
                ):
                    answers[position] = cut_at(text, until)
                progress.update(len(batch))
        progress.close()
        return answers

    def loglikelihood(self, requests):
        raise NotImplementedError("The aki lmms-eval model generates; none of the paper's tasks needs log-likelihoods.")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("Multi-round generation is not supported by the aki lmms-eval model yet.")
