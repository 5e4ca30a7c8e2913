"""A small Qwen2-style ChatML tokenizer built here (no downloads): byte-level BPE trained on a few
sentences, with Qwen2's normalizer and pre-tokenizer (so transformers' Qwen2Tokenizer, which rebuilds
both, reads it back token for token), no bos token and `<|im_end|>` as eos, as in Qwen2.5-Instruct."""

import json
from pathlib import Path

# Qwen2.5's template, cut down to plain messages: a default system turn, then ChatML turns.
CHATML = (
    "{%- if messages[0]['role'] != 'system' %}\n"
    "    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

# The same format with the assistant's tokens marked (TRL's assistant_only_loss templates): its
# content and <|im_end|>, not the newline after it.
CHATML_GENERATION = (
    "{%- if messages[0]['role'] != 'system' %}\n"
    "    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message['role'] == 'assistant' %}\n"
    "        {{- '<|im_start|>assistant\\n' }}\n"
    "        {%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}\n"
    "        {{- '\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
_CORPUS = ["You are a helpful assistant.", "What is 2+3? The answer is 5.", "system user assistant hello world",
           "Let me think step by step about the question."]


def write_chatml_tokenizer(directory, chat_template: str = CHATML, *, vocab_size: int = 320) -> Path:
    """tokenizer.json + tokenizer_config.json (Qwen2Tokenizer, bos null, eos <|im_end|>, pad
    <|endoftext|>, the template) in `directory`."""
    import tokenizers
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tok = tokenizers.Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.save(str(d / "tokenizer.json"))
    config = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "unk_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "add_prefix_space": False, "errors": "replace",
              "model_max_length": 32768, "chat_template": chat_template}
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return d
