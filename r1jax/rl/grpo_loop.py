"""The GRPO stage: sample G completions per prompt with the current policy, score them with the
rule-based rewards, and take μ clipped policy-gradient updates — rollout and training share one
params pytree in one process (no weight copy, identical MoE routing code)."""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from r1jax.checkpoint.manager import CheckpointManager, install_sigterm_handler, preemption_requested
from r1jax.config import GRPOConfig, ModelConfig
from r1jax.data.pipeline import make_prompt_iterator
from r1jax.data.tokenizer import load_tokenizer
from r1jax.eval.run import evaluate_model, prompt_rows
from r1jax.model.params import init_params
from r1jax.rl import grpo, rewards as rewards_lib, sampler
from r1jax.train import optimizer
from r1jax.model.params import param_shapes
from r1jax.train.loop import RunResult, _check_vocab, _write_run_config, resolve_model
from r1jax.train.metrics import MetricsWriter, to_host


@flax.struct.dataclass
class GRPOState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array
    ref_params: dict  # π_ref (empty when beta = 0)


@dataclasses.dataclass
class Rollout:
    """One step's sampled groups, host-side."""

    prompt_tokens: np.ndarray  # [N, Lp] left-padded
    prompt_mask: np.ndarray  # [N, Lp]
    completions: np.ndarray  # [N, M]
    lengths: np.ndarray  # [N]
    finished: np.ndarray  # [N]
    rewards: np.ndarray  # [N] (nan = could not be judged)
    per_reward: dict  # name -> [N]
    texts: list
    prompts_text: list
    answers: list


def _sample_groups(params, model_cfg, cfg: GRPOConfig, batch, tok, reward_set, seed) -> Rollout:
    G = cfg.num_generations
    rows = prompt_rows(batch)
    rep = [r for r in rows for _ in range(G)]
    out = sampler.sample(params, model_cfg, rep, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                         top_p=cfg.top_p, top_k=cfg.top_k, seed=seed, eos_id=tok.eos_id)
    texts = []
    for i in range(len(rep)):
        ids = out.tokens[i, : int(out.lengths[i])].tolist()
        if out.finished[i] and ids and ids[-1] == tok.eos_id:
            ids = ids[:-1]
        texts.append(tok.decode(ids))
    prompts_text = [tok.decode(r) for r in rep]
    answers = [str(a) if str(a) else None for a in batch["answer"] for _ in range(G)]
    total, per = reward_set(prompts_text, texts, answers=answers, completion_lengths=out.lengths.tolist(),
                            truncated=(~out.finished).tolist())
    r = np.array([np.nan if v is None else v for v in total], np.float64)
    if cfg.overlong == "soft":
        pen = rewards_lib.overlong_penalty(prompts_text, texts, completion_lengths=out.lengths.tolist(),
                                           max_length=cfg.max_new_tokens, cache_length=cfg.overlong_cache_length)
        per["overlong_penalty"] = pen
        r = r + np.array(pen)
    return Rollout(np.repeat(batch["tokens"], G, 0), np.repeat(batch["prompt_mask"], G, 0), out.tokens,
                   out.lengths, out.finished, r, per, texts, prompts_text, answers)


def _concat(rolls: list[Rollout]) -> Rollout:
    if len(rolls) == 1:
        return rolls[0]
    cat = lambda xs: np.concatenate(xs) if isinstance(xs[0], np.ndarray) else sum(xs, [])  # noqa: E731
    per = {k: sum((list(r.per_reward[k]) for r in rolls), []) for k in rolls[0].per_reward}
    return Rollout(**{f.name: (per if f.name == "per_reward" else cat([getattr(r, f.name) for r in rolls]))
                      for f in dataclasses.fields(Rollout)})


def _select_groups(roll: Rollout, keep: np.ndarray, G: int) -> Rollout:
    idx = np.concatenate([np.arange(g * G, (g + 1) * G) for g in np.flatnonzero(keep)]) if keep.any() else np.zeros(0, int)
    take = lambda x: x[idx] if isinstance(x, np.ndarray) else [x[i] for i in idx]  # noqa: E731
    return Rollout(**{f.name: ({k: take(v) for k, v in roll.per_reward.items()} if f.name == "per_reward"
                               else take(getattr(roll, f.name))) for f in dataclasses.fields(Rollout)})


def _zero_variance(roll: Rollout, G: int) -> np.ndarray:
    r = roll.rewards.reshape(-1, G)
    return np.nan_to_num(np.nanstd(r, axis=1), nan=0.0) == 0


def rollout(params, model_cfg, cfg: GRPOConfig, prompt_it, tok, reward_set, step: int):
    """Sample until P groups are collected; with dynamic sampling, groups whose rewards are all equal
    are dropped and more prompts sampled (DAPO), up to max_sampling_rounds. -> (Rollout, stats)."""
    G = cfg.num_generations
    want = cfg.prompts.batch_size
    rolls, kept, zero_var, seen = [], 0, 0, 0
    for rnd in range(cfg.max_sampling_rounds if cfg.dynamic_sampling else 1):
        batch = next(prompt_it)
        seed = int(np.uint32(hash((cfg.seed, step, rnd)) & 0xFFFFFFFF))
        roll = _sample_groups(params, model_cfg, cfg, batch, tok, reward_set, seed)
        zv = _zero_variance(roll, G)
        zero_var += int(zv.sum())
        seen += len(zv)
        if cfg.dynamic_sampling:
            roll = _select_groups(roll, ~zv, G)
        rolls.append(roll)
        kept += len(roll.lengths) // G
        if kept >= want:
            break
    roll = _concat(rolls)
    if cfg.dynamic_sampling and kept > want:
        roll = _select_groups(roll, np.arange(kept) < want, G)
    return roll, {"zero_variance_fraction": zero_var / max(seen, 1), "sampling_rounds": len(rolls)}


def training_batch(roll: Rollout, cfg: GRPOConfig, eos_id: int) -> dict:
    """Rollout -> arrays for the loss: tokens [N, Lp+M] (left-padded prompt, completion), positions
    restarting at the first real token, segment ids (0 = padding), completion mask, advantages."""
    N, M = roll.completions.shape
    comp_real = np.arange(M)[None, :] < roll.lengths[:, None]
    tokens = np.concatenate([roll.prompt_tokens, np.where(comp_real, roll.completions, eos_id)], axis=1)
    real = np.concatenate([roll.prompt_mask.astype(bool), comp_real], axis=1)
    positions = np.maximum(np.cumsum(real, axis=1) - 1, 0)
    valid = ~np.isnan(roll.rewards)
    mask = comp_real & valid[:, None]
    if cfg.overlong == "mask":
        mask &= roll.finished[:, None]  # DAPO overlong filtering: truncated samples teach nothing
    G = cfg.num_generations
    adv = grpo.advantages(jnp.asarray(np.nan_to_num(roll.rewards).reshape(-1, G), jnp.float32),
                          jnp.asarray(valid.reshape(-1, G)), scale=cfg.scale_rewards, eps=cfg.advantage_eps)
    return {"tokens": tokens.astype(np.int32), "positions": positions.astype(np.int32),
            "segment_ids": real.astype(np.int32), "completion_mask": mask,
            "advantages": np.asarray(adv).reshape(-1)}


def _update(state: GRPOState, batch: dict, *, cfg: ModelConfig, gcfg: GRPOConfig, tx):
    (_, metrics), grads = jax.value_and_grad(grpo.loss_fn, has_aux=True)(state.params, batch, cfg, gcfg)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    return state.replace(params=params, opt_state=opt_state), metrics


def _write_samples(run_dir: Path, step: int, roll: Rollout, adv: np.ndarray) -> None:
    d = run_dir / "samples"
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f"step_{step:06d}.jsonl", "w") as f:
        for i, text in enumerate(roll.texts):
            f.write(json.dumps({"prompt": roll.prompts_text[i], "completion": text, "answer": roll.answers[i],
                                "reward": None if np.isnan(roll.rewards[i]) else float(roll.rewards[i]),
                                "rewards": {k: v[i] for k, v in roll.per_reward.items()},
                                "advantage": float(adv[i]), "length": int(roll.lengths[i]),
                                "finished": bool(roll.finished[i])}) + "\n")


def _rollout_metrics(roll: Rollout, G: int) -> dict:
    m = {"reward/mean": float(np.nanmean(roll.rewards)) if len(roll.rewards) else 0.0,
         "reward/std": float(np.nanstd(roll.rewards)) if len(roll.rewards) else 0.0,
         "completion_length": float(np.mean(roll.lengths)) if len(roll.lengths) else 0.0,
         "truncated_fraction": float(np.mean(~roll.finished)) if len(roll.finished) else 0.0}
    for k, v in roll.per_reward.items():
        vals = np.array([np.nan if x is None else x for x in v], np.float64)
        m[f"reward/{k}"] = float(np.nanmean(vals)) if vals.size and not np.all(np.isnan(vals)) else 0.0
    return m


def train_grpo(cfg: GRPOConfig) -> RunResult:
    """Run (or resume) GRPO in cfg.out_dir."""
    run_dir = Path(cfg.out_dir)
    model_cfg, params = resolve_model(cfg)
    tok = load_tokenizer(cfg.prompts.tokenizer)
    _check_vocab(tok, model_cfg)
    reward_set = rewards_lib.reward_set(cfg.rewards)
    ckpt_cfg = cfg.checkpoint
    if not ckpt_cfg.directory:
        ckpt_cfg = dataclasses.replace(ckpt_cfg, directory=str(run_dir / "checkpoints"))
    run_dir.mkdir(parents=True, exist_ok=True)
    manager = CheckpointManager(ckpt_cfg, model_config=model_cfg)
    prompt_it = make_prompt_iterator(cfg.prompts, tok)
    tx = optimizer.build(cfg.optimizer, cfg.steps)
    update = jax.jit(functools.partial(_update, cfg=model_cfg, gcfg=cfg, tx=tx), donate_argnums=0)

    def fresh_state():
        p = params if params is not None else init_params(model_cfg, jax.random.key(cfg.seed))
        ref = jax.tree.map(jnp.copy, p) if cfg.beta > 0 else {}
        return GRPOState(jnp.zeros((), jnp.int32), p, tx.init(p), jax.random.key(cfg.seed), ref)

    start = manager.latest_step()
    if start is None:
        state, start = fresh_state(), 0
    else:
        def abstract():
            p = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), param_shapes(model_cfg))
            return GRPOState(jnp.zeros((), jnp.int32), p, tx.init(p), jax.random.key(cfg.seed),
                             p if cfg.beta > 0 else {})
        state, data_state = manager.restore(start, abstract_state=jax.eval_shape(abstract))
        prompt_it.set_state(data_state)
    _write_run_config(run_dir, cfg, model_cfg)
    writer = MetricsWriter(run_dir, resume_step=start)
    install_sigterm_handler()
    bar = None
    if cfg.progress and jax.process_index() == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="grpo", dynamic_ncols=True)
    status, last, step = "completed", {}, start
    try:
        while step < cfg.steps:
            t0 = time.perf_counter()
            roll, rstats = rollout(state.params, model_cfg, cfg, prompt_it, tok, reward_set, step)
            t_sample = time.perf_counter() - t0
            metrics = {**_rollout_metrics(roll, cfg.num_generations), **rstats}
            if len(roll.lengths) == 0:  # every group had equal rewards in every round: nothing to learn
                step += 1
            else:
                batch = training_batch(roll, cfg, tok.eos_id)
                dev = jax.tree.map(jnp.asarray, batch)
                t1 = time.perf_counter()
                dev["old_logp"] = grpo.rollout_logprobs(state.params, dev, model_cfg, cfg)
                if cfg.beta > 0:
                    dev["ref_logp"] = grpo.rollout_logprobs(state.ref_params, dev, model_cfg, cfg)
                t_logp = time.perf_counter() - t1
                t2 = time.perf_counter()
                for _ in range(cfg.num_iterations):
                    state, m = update(state, dev)
                m = to_host(m)
                t_update = time.perf_counter() - t2
                step += 1
                state = state.replace(step=jnp.asarray(step, jnp.int32))
                if cfg.beta > 0 and cfg.ref_refresh_steps and step % cfg.ref_refresh_steps == 0:
                    state = state.replace(ref_params=jax.tree.map(jnp.copy, state.params))
                metrics.update(m)
                metrics.update(time_sample=t_sample, time_logprob=t_logp, time_update=t_update)
                if cfg.samples_every and (step % cfg.samples_every == 0 or step == 1):
                    _write_samples(run_dir, step, roll, batch["advantages"])
            if not np.isfinite(metrics.get("loss", 0.0)):
                from r1jax.train.loop import TrainingDiverged

                raise TrainingDiverged(f"step {step}: GRPO loss is not finite; the last good checkpoint "
                                       f"(step {manager.latest_step()}) is intact in {manager.directory}")
            manager.save(step, state, prompt_it.get_state())
            if cfg.eval_prompts is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
                summary, _ = evaluate_model(state.params, model_cfg, cfg.eval_prompts, tok,
                                            num_samples=cfg.eval_samples, temperature=0.0 if cfg.eval_samples == 1 else cfg.temperature,
                                            max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
                metrics.update({f"eval/{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
            if step % cfg.log_every == 0 or step == cfg.steps:
                writer.write(step, metrics)
            last = metrics
            if bar is not None:
                bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", refresh=False)
                bar.update(1)
            if preemption_requested() or manager.reached_preemption(step):
                manager.save(step, state, prompt_it.get_state(), force=True)
                status = "preempted"
                break
        if status != "preempted":
            manager.save(step, state, prompt_it.get_state(), force=True)
    finally:
        manager.wait()
        manager.close()
        writer.close()
        if bar is not None:
            bar.close()
    (run_dir / "result.json").write_text(json.dumps({"status": status, "step": step, "metrics": last}, indent=1))
    return RunResult(status, step, run_dir, last)
