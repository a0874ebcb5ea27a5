"""Small helpers shared by the tests."""


def chat(question, answer=None, num_images=1):
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def encode(processor, messages, images, add_generation_prompt=None):
    if add_generation_prompt is None:
        add_generation_prompt = messages[-1]["role"] == "user"
    text = processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    return processor(images=images or None, text=text, return_tensors="pt")


def supervised_text(processor, encoded):
    """The decoded tokens an encoded sample takes the loss on."""
    ids = [token for token, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != -100]
    return processor.tokenizer.decode(ids)
