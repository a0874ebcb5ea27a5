"""The `aki` command: `aki chat`, streamed and interactive (`aki attention` is in test_attention_maps.py)."""

import io


def test_aki_chat_streams_the_answer(tiny_checkpoint, images, tmp_path, capsys):
    from aki.cli import Chat, interactive, load, main

    path = tmp_path / "photo.png"
    images[0].save(path)
    source = ["--model", str(tiny_checkpoint), "--image", str(path)]
    main(["chat", *source, "--max-new-tokens", "6", "What is in the image?"])
    streamed = capsys.readouterr().out
    model, processor = load(str(tiny_checkpoint))
    output = io.StringIO()
    chat = Chat(model, processor, max_new_tokens=6, output=output)
    chat.add_image(str(path))
    answer = chat.ask("What is in the image?")
    assert streamed.strip() == answer.strip() == output.getvalue().strip()
    # Interactive: an image, two turns (the second re-encodes the first), then quit.
    lines = iter([f"/image {path}", "What colour?", "And the shape?", "/quit"])
    chat = Chat(model, processor, max_new_tokens=4, output=io.StringIO())
    interactive(chat, read=lambda prompt: next(lines))
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]
    assert len(chat.images) == 1
