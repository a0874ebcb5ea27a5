"""How much image tokens attend to the question, layer by layer (the paper's qualitative analysis).

    aki attention --model DIR --image PATH "question" [--out attention_map.png]

For one prompt, each panel is a layer: rows are image tokens, columns the question tokens they
may see under MMA (up to and including the assistant header), values the attention weight averaged
over heads. Under causal attention the panels are empty by construction.
"""

from pathlib import Path

import torch


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
