"""Pictures of attention: a prompt's mask, and how much image tokens attend to the question.

    aki attention --model DIR --image PATH "question" [--out attention_map.png]

`save_attention_maps` draws one panel per layer (the paper's qualitative analysis): rows are image
tokens, columns the question tokens they may see under MMA (up to and including the assistant
header), values the attention weight averaged over heads. Under causal attention the panels are
empty by construction. `render_mask` draws a mask from `aki.masking` with each token's role.
The pure mask logic stays in `aki.masking`; drawing (PIL, numpy, matplotlib) lives here.
"""

from pathlib import Path

import numpy as np
import torch

from .masking import IMAGE, IMAGE_CAUSAL, OTHER, PADDING, QUESTION, ROLE_NAMES


def import_pyplot():
    """matplotlib's pyplot on the file backend, or an error that says which extra installs it."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("Drawing figures needs matplotlib: pip install 'aki[viz]'.") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@torch.no_grad()
def image_to_question_attention(model, processor, image, question: str) -> tuple[torch.Tensor, list[str]]:
    """(layers, image tokens, question tokens) attention weights, and the question tokens' text."""
    inputs = processor.question_inputs(image, question).to(model.device)
    windows = model.model.window_ids(inputs["input_ids"])[0]
    image_rows = (windows > 0).nonzero().flatten()
    question_columns = (windows < 0).nonzero().flatten()
    if len(image_rows) == 0:
        raise ValueError("The prompt has no image with a question window (no assistant header after the image?).")
    previous = model.config.text_config._attn_implementation
    model.set_attn_implementation("eager")  # the only backend that returns attention weights
    try:
        attentions = model(**inputs, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(previous)
    maps = torch.stack([layer[0].mean(0)[image_rows][:, question_columns] for layer in attentions])
    labels = [processor.tokenizer.decode([token]) for token in inputs["input_ids"][0, question_columns].tolist()]
    return maps.float().cpu(), labels


def save_attention_maps(model, processor, image, question: str, path: Path) -> Path:
    plt = import_pyplot()
    maps, labels = image_to_question_attention(model, processor, image, question)
    layers = maps.shape[0]
    figure, axes = plt.subplots(1, layers, figsize=(3.2 * layers + 1, 3.6), squeeze=False)
    for layer, axis in enumerate(axes[0]):
        shown = axis.imshow(maps[layer], aspect="auto", cmap="viridis")
        axis.set_title(f"layer {layer}: image -> question", fontsize=8)
        axis.set_xticks(range(len(labels)), [label.replace("\n", "\\n") for label in labels], rotation=90, fontsize=5)
        axis.set_ylabel("image token" if layer == 0 else "")
        figure.colorbar(shown, ax=axis, fraction=0.046)
    figure.suptitle(f"attention_policy={model.config.attention_policy}: {question[:80]}", fontsize=8)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=130)
    plt.close(figure)
    return path


ROLE_COLOURS = {
    OTHER: (90, 90, 90),
    IMAGE: (46, 139, 87),
    QUESTION: (65, 105, 225),
    IMAGE_CAUSAL: (143, 188, 143),
    PADDING: (230, 230, 230),
}
OPENED_COLOUR = (255, 140, 0)


def render_mask(
    allowed: torch.Tensor,
    roles: torch.Tensor,
    path: str,
    title: str | None = None,
    cell: int | None = None,
) -> str:
    """Save one sample's mask (s, s) as a PNG, rows = queries, columns = keys.

    An allowed cell takes the colour of its key's role, brightened where the MMA rectangle
    opened it (above the diagonal); a blocked cell is white. A strip above and to the left shows
    each token's role, and a legend names the colours.
    """
    from PIL import Image, ImageDraw

    s = allowed.shape[-1]
    cell = cell or max(1, min(8, 640 // max(s, 1)))
    strip, legend_h = 3 * cell + 4, 18 * (len(ROLE_NAMES) + 2)
    side = s * cell
    width, height = strip + side + 8, strip + side + legend_h + 8
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)

    allowed = allowed.bool().cpu()
    roles = roles.cpu()
    palette = torch.tensor([ROLE_COLOURS[r] for r in sorted(ROLE_COLOURS)], dtype=torch.uint8)
    key_colours = palette[roles].unsqueeze(0).expand(s, s, 3).clone()
    opened = allowed & torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)
    key_colours[opened] = torch.tensor(OPENED_COLOUR, dtype=torch.uint8)
    key_colours[~allowed] = 255
    grid = Image.fromarray(np.ascontiguousarray(key_colours.numpy())).resize((side, side), Image.NEAREST)
    image.paste(grid, (strip, strip))
    role_strip = Image.fromarray(np.ascontiguousarray(palette[roles][None].numpy())).resize(
        (side, strip - 4), Image.NEAREST
    )
    image.paste(role_strip, (strip, 0))
    image.paste(role_strip.transpose(Image.Transpose.TRANSPOSE), (0, strip))

    y = strip + side + 6
    if title:
        draw.text((4, y), title, fill="black")
        y += 18
    entries = [(ROLE_COLOURS[role], name) for role, name in ROLE_NAMES.items()]
    entries.append((OPENED_COLOUR, "opened by MMA (image query -> later question key)"))
    for colour, name in entries:
        draw.rectangle([4, y + 3, 14, y + 13], fill=colour)
        draw.text((20, y + 2), name, fill="black")
        y += 18
    image.save(path)
    return path
