"""Timing, memory, layouts and output shared by the benchmark scripts."""

import csv
import time
from pathlib import Path

import torch

from aki.masking import dense_attention_mask, mma_window_ids

IMAGE, MARKER, TEXT = 3, 7, 20
NUM_IMAGE_TOKENS, QUESTION_TOKENS = 144, 60


def layout(batch: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (b, s) shaped like AKI prompts: system text, 144 image tokens, a question, the header, an answer.

    Rows get different prefix lengths and right padding, so no two rows share a layout.
    """
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, length), TEXT, dtype=torch.long)
    valid = torch.ones(batch, length, dtype=torch.long)
    for row in range(batch):
        start = 20 + int(torch.randint(0, 16, (1,), generator=generator))
        ids[row, start : start + NUM_IMAGE_TOKENS] = IMAGE
        ids[row, start + NUM_IMAGE_TOKENS + QUESTION_TOKENS] = MARKER
        padding = int(torch.randint(0, length // 8, (1,), generator=generator))
        if padding:
            valid[row, -padding:] = 0
    return ids, valid


def official_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """A re-statement of the official code's mask: a dense (b, 1, s, s) integer mask built per sample in a
    Python loop, then turned into an additive float mask (as transformers 4.41 did with 4D masks)."""
    masks = []
    for row in range(input_ids.shape[0]):
        ids = input_ids[row]
        length = ids.shape[0]
        mask = torch.tril(torch.ones(length, length, dtype=torch.long))
        images = torch.where(ids == IMAGE)[0]
        markers = torch.where(ids == MARKER)[0]
        if len(images) and len(markers):
            image_start, text_start = int(images[0]), int(images[-1]) + 1
            mask[image_start:text_start, text_start : int(markers[0]) + 1] = 1
        mask[:, attention_mask[row] == 0] = 0
        masks.append(mask[None])
    dense = torch.stack(masks)
    return (1 - dense).to(dtype) * torch.finfo(dtype).min


def our_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Ours: window ids for the whole batch, then one broadcast -> bool (b, 1, s, s)."""
    windows = mma_window_ids(input_ids, IMAGE, [MARKER], attention_mask)
    allowed = dense_attention_mask(windows, attention_mask)
    return allowed | ~allowed.any(-1, keepdim=True)  # rows without keys (padding) attend everywhere, not NaN


def timed(function, repeats: int = 5, warmup: int = 1) -> float:
    """Median seconds of `function()` over `repeats` runs."""
    return timed_together({"function": function}, repeats, warmup)["function"]


def timed_together(functions: dict, repeats: int = 5, warmup: int = 1) -> dict:
    """Median seconds of each function, run in turn (round robin), so that load on a shared machine
    falls on all of them alike; {name: seconds}."""
    for function in functions.values():
        for _ in range(warmup):
            function()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            function()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(values)[len(values) // 2] for name, values in times.items()}


def peak_memory(function) -> float | None:
    """Peak CUDA memory of one call in MiB; None on the CPU (not measured there)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.reset_peak_memory_stats()
    function()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def print_table(title: str, rows: list[dict]) -> None:
    """A Markdown table of result rows (numbers to 4 significant digits)."""
    print(f"\n## {title}\n")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        cells = [f"{row.get(c):.4g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
        print("| " + " | ".join(cells) + " |")
