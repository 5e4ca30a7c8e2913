"""Data: tokenizer and R1 chat format, the built-in verifiable task, grain sources, packing, and the
pipeline that turns a DataConfig into numpy batches (pretrain, SFT, RL prompts)."""

from r1jax.data.pipeline import DataIterator, build_dataset, make_iterator, make_prompt_iterator
from r1jax.data.tasks import Problem, extract_answer, problems, verify
from r1jax.data.tokenizer import (
    Tokenizer, builtin_tokenizer, encode_chat, encode_prompt, load_tokenizer, render_chat,
)

__all__ = [
    "build_dataset", "make_iterator", "make_prompt_iterator", "DataIterator",
    "Problem", "problems", "extract_answer", "verify",
    "Tokenizer", "builtin_tokenizer", "load_tokenizer", "render_chat", "encode_chat", "encode_prompt",
]
