"""A fresh AKI from a pretrained SigLIP and a pretrained Phi-3 (what pre-training starts from)."""

import torch
from reference.phi_tokenizer import phi_like_tokenizer
from transformers import Phi3Config, Phi3ForCausalLM, SiglipVisionConfig, SiglipVisionModel

import aki


def test_from_parts_copies_weights_and_adds_the_official_tokens(tmp_path, images):
    torch.manual_seed(0)
    vision = SiglipVisionModel(
        SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8)
    )  # fmt: skip
    language = Phi3ForCausalLM(
        Phi3Config(vocab_size=32064, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                   num_key_value_heads=2, pad_token_id=32000, bos_token_id=1, eos_token_id=32000)
    )  # fmt: skip
    vision.save_pretrained(tmp_path / "siglip")
    language.save_pretrained(tmp_path / "phi")
    phi_like_tokenizer().save_pretrained(tmp_path / "phi")

    model, processor = aki.assemble.from_parts(str(tmp_path / "siglip"), str(tmp_path / "phi"), perceiver_num_latents=4)
    tokenizer = processor.tokenizer
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("<pad>", "<image>", "<|endofchunk|>")] == [32011, 32012, 32013]
    assert model.config.image_token_id == 32012 and model.config.assistant_marker_ids == [32001]
    assert model.config.text_config.vocab_size == 32014 and model.config.text_config.pad_token_id == 32011

    for name, tensor in vision.state_dict().items():
        if name.startswith("head."):  # SigLIP's pooling head: AKI reads last_hidden_state
            assert name not in model.model.vision_tower.state_dict()
            continue
        assert torch.equal(model.model.vision_tower.state_dict()[name], tensor), name
    qkv = "layers.0.self_attn.qkv_proj.weight"
    assert torch.equal(model.model.language_model.state_dict()[qkv], language.model.state_dict()[qkv])
    embeddings, original = model.get_input_embeddings().weight, language.get_input_embeddings().weight
    assert torch.equal(embeddings[:32012], original[:32012])  # <pad> reuses Phi's row 32011, as officially
    assert not torch.equal(embeddings[32012:], original[32012:32014])  # <image>, <|endofchunk|> start fresh
    assert torch.equal(model.lm_head.weight[:32012], language.lm_head.weight[:32012])

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=images[:1], text=prompt, return_tensors="pt")
    assert (model.model.window_ids(inputs["input_ids"]) > 0).sum() == 4
    with torch.no_grad():
        assert model(**inputs).logits.shape[-1] == 32014
