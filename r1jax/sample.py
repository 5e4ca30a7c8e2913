"""The `r1jax sample` command: sample completions for the prompts of a jsonl file from a model directory
(a HF directory or an r1jax checkpoint, read by `load_pretrained`) and write them as jsonl rows. The
sampling itself is `r1jax.infer.sampler`'s.
"""

from __future__ import annotations

import json

from r1jax import paths
from r1jax.api import load_pretrained
from r1jax.config import ModelConfig
from r1jax.data.tokenizer import load_tokenizer, model_tokenizer_dir
from r1jax.errors import ConfigError, DataError
from r1jax.infer.sampler import (SampleOutput, check_options, check_prompts, check_token_id, prompt_bucket,
                                 sample_rows, stop_table_of)
from r1jax.model.kv_cache import ALL_MODES, resolve_cache


def _read_prompts(path, tokenizer) -> list[tuple[dict, list[int], int]]:
    """(row, token ids, line number) for each non-blank line of a prompts jsonl."""
    rows = []
    try:
        lines = paths.as_path(path).read_text().splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: prompts file not found") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: expected a JSON object")
        if "prompt_ids" in row:
            ids = row["prompt_ids"]
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise DataError(f"{path}:{n}: prompt_ids must be a list of ints")
        elif "prompt" in row or "messages" in row:
            if tokenizer is None:
                raise DataError(f"{path}:{n}: has a text 'prompt' but the model directory has no tokenizer.json "
                                f"(give 'prompt_ids' instead)")
            ids = _prompt_ids(tokenizer, row, f"{path}:{n}")
        else:
            raise DataError(f"{path}:{n}: needs 'prompt_ids' (or 'prompt'/'messages' with a tokenizer)")
        rows.append((row, ids, n))
    if not rows:
        raise DataError(f"{path}: no prompts")
    return rows


class _BareTokenizer:
    """A tokenizer.json without tokenizer_config.json: no special tokens or template to go by, so text
    prompts only and no stop ids beyond the config's."""

    stop_ids = ()

    def __init__(self, path):
        from tokenizers import Tokenizer

        self.hf = Tokenizer.from_str(path.read_text())  # local or gs://

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)


def _model_tokenizer(model_dir):
    d = model_tokenizer_dir(model_dir)
    if d is None:
        return None
    return load_tokenizer(d) if (d / "tokenizer_config.json").is_file() else _BareTokenizer(d / "tokenizer.json")


def _prompt_ids(tokenizer, row: dict, where: str) -> list[int]:
    """A text `prompt` is encoded as it is (with what tokenizer.json's post-processor adds, e.g. bos);
    chat messages (`messages`, or a list as `prompt`) are rendered by the model's chat template up to
    its generation prompt."""
    from r1jax.data.tokenizer import encode_prompt

    value = row.get("messages", row.get("prompt"))
    if isinstance(value, str):
        return tokenizer.hf.encode(value).ids
    if isinstance(tokenizer, _BareTokenizer):
        raise DataError(f"{where}: chat messages need the model's tokenizer_config.json (its chat template)")
    try:
        return encode_prompt(tokenizer, value)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None


def _default_stops(cfg: ModelConfig):
    """EOS from config.json; a list-valued eos_token_id (kept in hf_extra) adds stop ids."""
    extra = cfg.hf_extra.get("eos_token_id")
    extra = list(extra) if isinstance(extra, (list, tuple)) else []
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else (extra[0] if extra else None)
    return eos, [t for t in extra if t != eos]


def _progress(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="sample", desc="sampling")


def sample_file(model_dir, prompts_jsonl, out_jsonl, *, max_new_tokens: int, temperature: float = 1.0,
                top_p: float = 1.0, top_k: int = 0, seed: int = 0, num_samples: int = 1, batch_size: int = 16,
                cache: str | None = None) -> int:
    """Sample num_samples completions for each row of a jsonl of {"prompt_ids": [...]} (or, when model_dir
    has a tokenizer, {"prompt": text} or chat {"messages": [...]} rendered by its chat template up to
    the generation prompt) and write one row per sample: the input row's fields plus prompt_index,
    sample_index, completion_ids, completion (text, with a tokenizer), logprobs, finish_reason. Stops at
    the config's EOS and the tokenizer's stop ids. Returns the number of rows written."""
    # The architecture is known only once the model is read: accept any architecture's mode name here.
    check_options(max_new_tokens, temperature, top_p, top_k, cache, seed, ALL_MODES)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"num_samples: must be an int >= 1, got {num_samples!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size: must be an int >= 1, got {batch_size!r}")
    if not paths.as_path(model_dir).exists():
        raise ConfigError(f"--ckpt {model_dir}: does not exist (a Hugging Face directory, an r1jax checkpoint "
                          f"or a training run's directory)")
    tokenizer = _model_tokenizer(model_dir)
    rows = _read_prompts(prompts_jsonl, tokenizer)
    cfg, params = load_pretrained(model_dir)
    cache = resolve_cache(cfg, cache)
    eos, extra_stops = _default_stops(cfg)
    if tokenizer is not None:  # the chat template's end of turn (e.g. ChatML's <|im_end|>) also ends a sample
        extra_stops = list(dict.fromkeys(extra_stops + [t for t in tokenizer.stop_ids if t != eos]))
    if eos is not None:
        check_token_id("eos_token_id (config.json)", eos, cfg)
    # Validate every prompt before the first compile.
    prompts = check_prompts([ids for _, ids, _ in rows], cfg, max_new_tokens,
                             label=lambda b: f"{prompts_jsonl}:{rows[b][2]}: prompt")
    jobs = [(i, j) for i in range(len(rows)) for j in range(num_samples)]
    batch_size = min(batch_size, len(jobs))
    bucket = prompt_bucket(max(len(r) for r in prompts))  # one bucket for the file: one compile
    out_path = paths.as_path(out_jsonl)  # local or gs:// (an object is uploaded when closed)
    paths.makedirs(out_path.parent)
    with out_path.open("w") as f, _progress(len(jobs)) as bar:
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            # Pad the last chunk to batch_size so it reuses the compiled loop; row ids are global so a
            # sample does not depend on batch_size.
            padded = chunk + [chunk[0]] * (batch_size - len(chunk))
            ids = list(range(start, start + len(padded)))
            out = sample_rows(params, cfg, [prompts[i] for i, _ in padded], max_new_tokens=max_new_tokens,
                              temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, eos_id=eos,
                              stop_table=stop_table_of(extra_stops, eos, len(padded), cfg), cache=cache, mesh=None,
                              row_ids=ids, bucket=bucket)
            for b, (i, j) in enumerate(chunk):
                f.write(json.dumps(_record(rows[i][0], i, j, out, b, tokenizer)) + "\n")
            bar.update(len(chunk))
    return len(jobs)


def _record(row: dict, i: int, j: int, out: SampleOutput, b: int, tokenizer) -> dict:
    n = int(out.lengths[b])
    ids = out.tokens[b, :n].tolist()
    rec = dict(row, prompt_index=i, sample_index=j, completion_ids=ids,
               logprobs=[float(x) for x in out.logprobs[b, :n]], finish_reason=out.finish_reasons[b])
    if tokenizer is not None:
        rec["completion"] = tokenizer.decode(ids, skip_special_tokens=True)
    return rec
