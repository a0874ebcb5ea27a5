"""A stand-in for the Phi-3.5-mini tokenizer with its real special-token ids, built offline.

Ids 0-2 are <unk>, <s>, </s>; bytes follow; fillers pad the base vocabulary to 32000; then the
Phi-3 chat tokens take their real ids 32000-32010 (<|endoftext|> 32000, <|assistant|> 32001,
<|system|> 32006, <|end|> 32007, <|user|> 32010). `<s>` is prepended to every encoding.
"""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PHI3_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
    "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>",
]  # fmt: skip


def phi_like_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for character in sorted(pre_tokenizers.ByteLevel.alphabet()):  # a set: sorted, for stable ids
        vocab[character] = len(vocab)
    while len(vocab) < 32000:
        vocab[f"<|filler{len(vocab)}|>"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="<|endoftext|>", unk_token="<unk>"
    )
    wrapped.add_special_tokens(
        {"additional_special_tokens": PHI3_SPECIAL_TOKENS}
    )  # a key transformers 4 and 5 both read
    assert wrapped.convert_tokens_to_ids("<|user|>") == 32010
    return wrapped
