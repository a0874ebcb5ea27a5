"""A saved AKI folder carries its code: it loads with `trust_remote_code=True` in a Python that cannot
import `aki`, through every Auto class and `pipeline`, and answers as the installed package does."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

from aki.presets import build_tiny

QUESTION = "What is in the image?"

# Run in a fresh Python where `import aki` (and the recipes) fails: every class comes from the folder.
REMOTE = textwrap.dedent(
    """
    import json, sys
    for name in ("aki", "aki_demo", "aki_training", "aki_eval"):
        sys.modules[name] = None  # import aki -> ImportError
    try:
        import aki
    except ImportError:
        pass
    else:
        raise SystemExit("aki was importable")

    import torch
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor, pipeline

    folder, image_path, question, out = sys.argv[1:5]
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    base = AutoModel.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    classes = [type(o).__module__ for o in (config, model, base, processor, processor.image_processor)]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=Image.open(image_path), text=prompt, return_tensors="pt")
    tensors = {}
    with torch.no_grad():
        for policy in ("mma", "causal"):
            model.config.attention_policy = policy
            tensors[policy] = model(**inputs).logits
        model.config.attention_policy = "mma"
        tensors["base"] = base(**inputs).last_hidden_state
        tensors["greedy"] = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out + ".safetensors")
    chat = [{"role": "user", "content": [{"type": "image", "url": image_path}, {"type": "text", "text": question}]}]
    reply = pipeline("image-text-to-text", model=folder, trust_remote_code=True)(
        text=chat, max_new_tokens=6, do_sample=False, return_full_text=False
    )
    json.dump({"classes": classes, "auto_class": config.auto_map, "pipeline": reply[0]["generated_text"]}, open(out + ".json", "w"))
    """
)


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_a_saved_folder_loads_with_its_own_code_where_aki_is_not_installed(preset, images, tmp_path):
    model, processor = build_tiny(preset, seed=0)
    folder = tmp_path / "aki"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_aki.AkiConfig",
        "AutoModel": "modeling_aki.AkiModel",
        "AutoModelForImageTextToText": "modeling_aki.AkiForConditionalGeneration",
    }
    assert json.loads((folder / "processor_config.json").read_text())["auto_map"] == {
        "AutoProcessor": "processing_aki.AkiProcessor"
    }
    image_path = tmp_path / "astronaut.png"
    images[0].resize((64, 64)).save(image_path)

    out = tmp_path / "remote"
    environment = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    subprocess.run(
        [sys.executable, "-c", REMOTE, str(folder), str(image_path), QUESTION, str(out)],
        check=True,
        env=environment,
        cwd=tmp_path,  # not the checkout, whose folders would be importable from the working directory
        timeout=600,
    )
    remote = json.loads(out.with_suffix(".json").read_text())
    assert all(module.startswith("transformers_modules.") for module in remote["classes"]), remote["classes"]
    tensors = load_file(out.with_suffix(".safetensors"))

    local = AutoModelForImageTextToText.from_pretrained(folder)  # `import aki`'s classes
    local_processor = AutoProcessor.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = local_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    from PIL import Image

    inputs = local_processor(images=Image.open(image_path), text=prompt, return_tensors="pt")
    with torch.no_grad():
        for policy in ("mma", "causal"):
            local.config.attention_policy = policy
            torch.testing.assert_close(local(**inputs).logits, tensors[policy], rtol=0, atol=1e-6)
        local.config.attention_policy = "mma"
        greedy = local.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert not torch.allclose(tensors["mma"], tensors["causal"])  # the remote code applies MMA
    assert torch.equal(greedy, tensors["greedy"])
    torch.testing.assert_close(local.model(**inputs).last_hidden_state, tensors["base"], rtol=0, atol=1e-6)

    chat = [
        {"role": "user", "content": [{"type": "image", "url": str(image_path)}, {"type": "text", "text": QUESTION}]}
    ]
    reply = pipeline("image-text-to-text", model=str(folder))(
        text=chat, max_new_tokens=6, do_sample=False, return_full_text=False
    )
    assert remote["pipeline"] == reply[0]["generated_text"]
