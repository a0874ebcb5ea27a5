"""A fresh AKI around a pretrained language model (what pre-training starts from): from a
pretrained SigLIP, or a fresh vision tower of a given config."""

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from reference.phi_tokenizer import phi_like_tokenizer
from transformers import Phi3Config, Phi3ForCausalLM, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

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


def test_a_fresh_vision_tower_in_front_of_a_pretrained_qwen2_speaks_chatml(tmp_path, images):
    from helpers import chat, save_tiny_qwen2, supervised_text

    from aki_training.encode import encode_conversation

    save_tiny_qwen2(tmp_path / "qwen2")
    language = Qwen2ForCausalLM.from_pretrained(tmp_path / "qwen2")
    vision = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 48, "patch_size": 16}  # fmt: skip
    model, processor = aki.assemble.from_parts(vision, str(tmp_path / "qwen2"), connector_type="mlp")
    tokenizer = processor.tokenizer

    assert model.config.vision_config.image_size == 48 and model.config.num_image_tokens == 9
    assert model.config.assistant_marker_ids == tokenizer.encode("<|im_start|>assistant", add_special_tokens=False)
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert model.generation_config.eos_token_id == sorted([im_end, endoftext])  # the base EOS and the answer's end
    mlp = "layers.1.mlp.down_proj.weight"
    assert torch.equal(model.model.language_model.state_dict()[mlp], language.model.state_dict()[mlp])
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # tied, as Qwen2's

    prompt = processor.apply_chat_template(chat("What colour?"), add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>user\n<image>\nWhat colour?<|im_end|>\n<|im_start|>assistant\n")
    encoded = encode_conversation(processor, chat("What colour?", "red"), images[:1], max_length=128)
    assert supervised_text(processor, encoded) == "red<|im_end|>\n"
    # MMA: the image tokens attend to the question, never to the answer.
    from aki.masking import dense_attention_mask

    ids = torch.tensor([encoded.input_ids])
    allowed = dense_attention_mask(model.model.window_ids(ids), torch.ones_like(ids), "mma")[0]
    image = (ids[0] == model.config.image_token_id).nonzero().flatten()
    question = torch.tensor(
        [i for i, t in enumerate(encoded.input_ids) if t in tokenizer.encode("What colour?", add_special_tokens=False)]
    )
    answer = torch.tensor([i for i, label in enumerate(encoded.labels) if label != -100])
    assert allowed[image[0]][question].all() and not allowed[image][:, answer].any()


def test_the_chat_format_follows_the_family_then_the_tokenizer():
    from types import SimpleNamespace

    def speaking(*tokens):
        return SimpleNamespace(get_vocab=lambda: {token: index for index, token in enumerate(tokens)})

    chat_format = aki.assemble.chat_format
    assert chat_format("llama", speaking("<|start_header_id|>", "<|im_start|>")) == "llama3"
    assert chat_format("llama", speaking("<|im_start|>", "<|im_end|>")) == "chatml"  # SmolLM
    assert chat_format("qwen2", speaking("<|im_start|>", "<|assistant|>")) == "chatml"
    assert chat_format("mistral", speaking("<|assistant|>")) == "phi3"
    with pytest.raises(ValueError, match=r"none of .*<\|im_start\|>"):
        chat_format("gpt2", speaking("hello"))


def test_the_connector_norm_starts_image_tokens_at_the_scale_of_the_words(tmp_path, images):
    """connector_norm: the MLP connector ends in an RMSNorm whose weight starts at the LM's mean word
    RMS, so every image token has a word's scale whatever the connector's weights; it survives a save."""
    from helpers import save_tiny_qwen2
    from transformers import AutoModelForImageTextToText

    save_tiny_qwen2(tmp_path / "qwen2")
    vision = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 16}  # fmt: skip
    model, processor = aki.assemble.from_parts(
        vision, str(tmp_path / "qwen2"), connector_type="mlp", connector_norm=True
    )
    words = Qwen2ForCausalLM.from_pretrained(tmp_path / "qwen2").get_input_embeddings().weight.detach()
    word_rms = float(words.pow(2).mean(-1).sqrt().mean())  # over the LM's own words
    assert torch.allclose(
        model.model.connector.norm.weight, torch.full_like(model.model.connector.norm.weight, word_rms)
    )
    pixels = processor.image_processor(images[:2], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        model.model.connector.linear_2.weight.mul_(50)  # an 11x drift, as the unnormalised connector made
        tokens = model.model.get_image_features(pixel_values=pixels).pooler_output
    torch.testing.assert_close(tokens.pow(2).mean(-1).sqrt(), torch.full(tokens.shape[:2], word_rms), rtol=1e-3, atol=0)

    model.save_pretrained(tmp_path / "aki")
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "aki")
    assert loaded.config.connector_norm and torch.equal(
        loaded.model.connector.norm.weight, model.model.connector.norm.weight
    )
    plain, _ = aki.assemble.from_parts(vision, str(tmp_path / "qwen2"), connector_type="mlp")
    assert "model.connector.norm.weight" not in plain.state_dict()  # checkpoints without the norm keep their keys
    with pytest.raises(StrictDataclassClassValidationError, match="connector_norm needs connector_type='mlp'"):
        aki.AkiConfig(connector_type="perceiver", connector_norm=True)
