"""vLLM's scheduler with one rule more: a prefill chunk never ends inside an image's MMA window.

Under chunked prefill vLLM cuts a prompt wherever the step's token budget runs out. An image
computed in one chunk and its question in the next would have been computed without the question,
which MMA cannot repair later. Before vLLM schedules a request's encoder inputs (the one
overridable step every multimodal chunk passes through), the chunk is cut back to the first image
row of a window it would split (`aki.masking.exact_chunk_end`); the rest of the window goes whole
into a later step. A window longer than the whole token budget can never fit one step: that
request alone is finished with an error that names the budget.

The plugin installs it for MMA models (`aki.vllm_plugin.engine_config`) through
`scheduler_cls`, as `mma_scheduler`, which builds the synchronous or asynchronous variant that vLLM
would have built.
"""

from __future__ import annotations

import torch
from vllm.logger import init_logger
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request

from ..masking import exact_chunk_end, mma_window_ids

# Under "vllm.", so that vLLM's logging configuration shows it.
logger = init_logger(f"vllm.{__name__}")


class MmaChunking:
    """The chunk rule, mixed into vLLM's `Scheduler` or `AsyncScheduler` (module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        config = self.vllm_config.model_config.hf_config
        self.image_token_id = config.image_token_id
        self.assistant_marker_ids = list(config.assistant_marker_ids)
        self.windows: dict[str, torch.Tensor] = {}  # request id -> its prompt's window ids

    def window_ids(self, request: Request) -> torch.Tensor:
        windows = self.windows.get(request.request_id)
        if windows is None:
            ids = torch.tensor(request.prompt_token_ids)
            windows = mma_window_ids(ids[None], self.image_token_id, self.assistant_marker_ids)[0]
            self.windows[request.request_id] = windows
        return windows

    def _try_schedule_encoder_inputs(
        self,
        request: Request,
        num_computed_tokens: int,
        num_new_tokens: int,
        encoder_compute_budget: int,
        shift_computed_tokens: int = 0,
    ):
        if num_computed_tokens >= request.num_prompt_tokens:  # decoding: no window opens in generated text
            return super()._try_schedule_encoder_inputs(
                request, num_computed_tokens, num_new_tokens, encoder_compute_budget, shift_computed_tokens
            )
        window = self.window_ids(request)
        end = exact_chunk_end(window, num_computed_tokens, num_computed_tokens + num_new_tokens)
        if end == num_computed_tokens and num_new_tokens > 0:
            self.refuse_if_never_fits(request, window, num_computed_tokens)
        scheduled, num_new_tokens, budget, external, duplicate = super()._try_schedule_encoder_inputs(
            request, num_computed_tokens, end - num_computed_tokens, encoder_compute_budget, shift_computed_tokens
        )
        # vLLM may have cut the chunk further (before an image the encoder cannot take now): cut again.
        end = exact_chunk_end(window, num_computed_tokens, num_computed_tokens + num_new_tokens)
        return scheduled, end - num_computed_tokens, budget, external, duplicate

    def refuse_if_never_fits(self, request: Request, window: torch.Tensor, start: int) -> None:
        """Finish `request` with an error when the window starting at `start` exceeds the whole budget."""
        own = int(window[start])
        needed = int((window == -own).nonzero().max()) + 1 - start
        budget = self.scheduler_config.max_num_batched_tokens
        if needed <= budget:
            return  # it fits an emptier step
        logger.warning(
            "Request %s: an image, its question and the assistant header take %d tokens, more than "
            "--max-num-batched-tokens (%d); AKI's MMA needs them in one step: raise the budget.",
            request.request_id,
            needed,
            budget,
        )
        # vLLM finishes the requests in this set with an error at the end of the step.
        self.encoder_cache_mismatch_reqs.add(request.request_id)

    def _free_request(self, request: Request, *args, **kwargs):
        self.windows.pop(request.request_id, None)
        return super()._free_request(request, *args, **kwargs)


class MmaScheduler(MmaChunking, Scheduler):
    pass


class MmaAsyncScheduler(MmaChunking, AsyncScheduler):
    pass


def mma_scheduler(*args, vllm_config, **kwargs) -> Scheduler:
    """The scheduler vLLM would build (asynchronous or not), with AKI's chunk rule."""
    cls = MmaAsyncScheduler if vllm_config.scheduler_config.async_scheduling else MmaScheduler
    return cls(*args, vllm_config=vllm_config, **kwargs)
