"""The GRPO stage: sample G completions per prompt with the current policy, score them with the
rule-based rewards, and take the rollout's clipped policy-gradient steps (M mini-batches × μ passes,
rl/grpo_update.py) — rollout and training share one
params pytree in one process (no weight copy, identical MoE routing code).

Every run is a mesh run, like SFT's (`train/loop.py`): the state lives in the shardings the rules give
it, the sampler splits the rollout rows over the batch axes (data×fsdp×expert) and reads the params
where they lie, and the training batch is split the same way. Every process computes the same rollout
(whole prompt batch, replicated sampler output, the same rewards: each process scores a block of
the rows and one all-gather shares the scores), so host-side decisions (dynamic sampling rounds,
padding) agree; only process 0 writes files other than checkpoints."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from r1jax.config import GRPOConfig
from r1jax.data.pipeline import make_prompt_iterator
from r1jax.data.tokenizer import completion_texts, load_tokenizer
from r1jax.eval.run import evaluate_model, prompt_rows
from r1jax.infer import sampler
from r1jax.model.params import init_params, param_shapes
from r1jax.model.sharding import param_shardings
from r1jax.parallel import rules as rules_lib
from r1jax.rl import grpo, rewards as rewards_lib
from r1jax.rl.grpo_update import (batch_shapes, batch_shardings, check_mesh, init_state, make_steps,
                                  needs_old_logprobs, optimizer_steps, row_order)
from r1jax.train import optimizer
from r1jax.train.metrics import to_host
from r1jax.train.run import Run, RunResult, check_vocab, mesh_and_model


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


def _allgather(x: np.ndarray) -> np.ndarray:
    """[count, *x.shape] from every process; float32 on the wire (the rewards TRL gathers are too)."""
    return np.asarray(multihost_utils.process_allgather(x.astype(np.float32)), np.float64)


def _sample_groups(params, model_cfg, cfg: GRPOConfig, batch, tok, reward_set, seed, mesh=None, step: int = 0):
    """-> (Rollout, seconds sampling, seconds scoring: detokenizing and the reward functions).
    Each process scores its block of the rows and the scores are gathered once (rewards.score_split)."""
    G = cfg.num_generations
    rows = prompt_rows(batch)
    rep = [r for r in rows for _ in range(G)]
    t0 = time.perf_counter()
    out = sampler.sample(params, model_cfg, rep, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                         top_p=cfg.top_p, top_k=cfg.top_k, seed=seed, eos_id=tok.eos_id,
                         stop_ids=tok.extra_stop_ids or None, mesh=mesh, rules=cfg.mesh,
                         bucket=cfg.prompts.seq_len)
    t1 = time.perf_counter()
    texts = completion_texts(tok, out.tokens, out.lengths, out.finished)
    prompts_text = [tok.decode(r) for r in rep]
    answers = [str(a) if str(a) else None for a in batch["answer"] for _ in range(G)]
    lengths = out.lengths.tolist()
    prompts, completions, fields = rewards_lib.rollout_inputs(
        batch, G, texts, [row[:n].tolist() for row, n in zip(out.tokens, lengths)], (~out.finished).tolist(),
        prompts_text)
    scores = rewards_lib.score_split(reward_set, prompts, completions, fields, rewards_lib.context(step, cfg.steps),
                                     process_index=jax.process_index(), process_count=jax.process_count(),
                                     gather=_allgather)
    r, per = reward_set.combine(scores), reward_set.per_function(scores)
    if cfg.overlong == "soft":
        pen = rewards_lib.overlong_penalty(prompts, completions, completion_lengths=lengths,
                                           max_length=cfg.max_new_tokens, cache_length=cfg.overlong_cache_length)
        per["overlong_penalty"] = pen
        r = r + np.array(pen)
    roll = Rollout(np.repeat(batch["tokens"], G, 0), np.repeat(batch["prompt_mask"], G, 0), out.tokens,
                   out.lengths, out.finished, r, per, texts, prompts_text, answers)
    return roll, t1 - t0, time.perf_counter() - t1


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


def rollout(params, model_cfg, cfg: GRPOConfig, prompt_it, tok, reward_set, step: int, mesh=None):
    """Sample until P groups are collected; with dynamic sampling, groups whose rewards are all equal
    are dropped and more prompts sampled (DAPO), up to max_sampling_rounds. -> (Rollout, stats).
    Every process computes the same rollout (same prompts, replicated sampler output), so their
    decisions agree; the sampling itself is split over the mesh."""
    G = cfg.num_generations
    want = cfg.prompts.batch_size
    rolls, kept, zero_var, seen, t_sample, t_reward = [], 0, 0, 0, 0.0, 0.0
    for rnd in range(cfg.max_sampling_rounds if cfg.dynamic_sampling else 1):
        batch = next(prompt_it)
        seed = int(np.uint32(hash((cfg.seed, step, rnd)) & 0xFFFFFFFF))
        roll, ts, tr = _sample_groups(params, model_cfg, cfg, batch, tok, reward_set, seed, mesh, step)
        t_sample, t_reward = t_sample + ts, t_reward + tr
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
    return roll, {"zero_variance_fraction": zero_var / max(seen, 1), "sampling_rounds": len(rolls),
                  "time_sample": t_sample, "time_reward": t_reward}


def training_batch(roll: Rollout, cfg: GRPOConfig, eos_id: int, rows: int | None = None) -> dict:
    """Rollout -> arrays for the loss: tokens [N, Lp+M] (left-padded prompt, completion), positions
    restarting at the first real token, segment ids (0 = padding), completion mask, advantages, and
    sample_mask [N]. With `rows`, padded to that many rows (copies of row 0 that carry no loss and are
    no completions: sample_mask False), so every step has one shape that splits over the mesh."""
    N, M = roll.completions.shape
    comp_real = np.arange(M)[None, :] < roll.lengths[:, None]
    tokens = np.concatenate([roll.prompt_tokens, np.where(comp_real, roll.completions, eos_id)], axis=1)
    real = np.concatenate([roll.prompt_mask.astype(bool), comp_real], axis=1)
    positions = np.maximum(np.cumsum(real, axis=1) - 1, 0)
    valid = ~np.isnan(roll.rewards)
    mask = comp_real & valid[:, None] if cfg.unscored == "drop" else comp_real
    if cfg.overlong == "mask":
        mask &= roll.finished[:, None]  # DAPO overlong filtering: truncated samples teach nothing
    G = cfg.num_generations
    adv = grpo.advantages(jnp.asarray(np.nan_to_num(roll.rewards).reshape(-1, G), jnp.float32),
                          jnp.asarray(valid.reshape(-1, G)), scale=cfg.scale_rewards, eps=cfg.advantage_eps)
    batch = {"tokens": tokens.astype(np.int32), "positions": positions.astype(np.int32),
             "segment_ids": real.astype(np.int32), "completion_mask": mask,
             "advantages": np.asarray(adv, np.float32).reshape(-1), "sample_mask": np.ones(N, bool)}
    extra = 0 if rows is None else rows - N
    if extra > 0:
        pad = {"completion_mask": False, "advantages": 0.0, "sample_mask": False}
        batch = {k: np.concatenate([v, np.repeat(np.full_like(v[:1], pad[k]) if k in pad else v[:1], extra, 0)])
                 for k, v in batch.items()}
    return batch


def global_batch(batch: dict, shardings: dict) -> dict:
    """Every process holds the whole batch (the same rollout); each device takes its rows."""
    return {k: jax.make_array_from_process_local_data(shardings[k], v, v.shape) for k, v in batch.items()}


def _write_samples(run_dir: Path, step: int, roll: Rollout, adv: np.ndarray) -> None:
    d = run_dir / "samples"
    d.mkdir(parents=True, exist_ok=True)
    with (d / f"step_{step:06d}.jsonl").open("w") as f:  # the run directory may be gs://
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


def update_metrics(m: dict) -> dict:
    """The update's per-optimizer-step metrics [μ·M] -> the rollout's means, the first step's loss and
    ratio (on-policy: 1) and the last step's (how far the rollout's last mini-batch is off-policy)."""
    out = {k: float(np.mean(v)) for k, v in m.items()}
    if len(m["loss"]) > 1:
        out.update({"loss/first": float(m["loss"][0]), "loss/last": float(m["loss"][-1]),
                    "ratio_mean/last": float(m["ratio_mean"][-1])})
    return out


@dataclasses.dataclass
class Session:
    """Everything a GRPO run holds besides its state: the mesh, model, tokenizer, rewards, prompts and
    the compiled steps (`prepare`); `step` advances a state by one rollout."""

    cfg: GRPOConfig
    mesh: object
    model_cfg: object
    params: dict | None  # the initial params (None: initialized from cfg.seed)
    tok: object
    reward_set: rewards_lib.RewardSet
    prompt_it: object
    tx: object
    abstract: object
    state_sh: object
    batch_sh: dict
    steps: object

    def init_state(self):
        """A fresh state from the initial params, laid out by the rules (no checkpoint)."""
        params = self.params
        if params is None:
            params = init_params(self.model_cfg, jax.random.key(self.cfg.seed), out_shardings=self.state_sh.params)
        params = jax.device_put(params, self.state_sh.params)
        return jax.jit(lambda p: init_state(p, self.tx, self.cfg), out_shardings=self.state_sh)(params)

    def step(self, state, step: int):
        """One rollout and its M·μ optimizer steps (call inside the mesh's sharding_context).
        -> (state, metrics, rollout, training batch or None when no group had reward variance)."""
        cfg, steps = self.cfg, self.steps
        roll, rstats = rollout(state.params, self.model_cfg, cfg, self.prompt_it, self.tok, self.reward_set, step,
                               self.mesh)
        metrics = {**_rollout_metrics(roll, cfg.num_generations), **rstats}
        if len(roll.lengths) == 0:  # every group had equal rewards in every round: nothing to learn
            return state, metrics, roll, None
        batch = training_batch(roll, cfg, self.tok.eos_id, rows=cfg.prompts.batch_size * cfg.num_generations)
        order = row_order(len(batch["tokens"]), cfg, step)
        dev = global_batch({k: v[order] for k, v in batch.items()}, self.batch_sh)
        t1 = time.perf_counter()
        inputs = dict(dev)
        if needs_old_logprobs(cfg):  # π_old: the params that sampled, fixed for the whole rollout
            dev["old_logp"] = steps.logprobs(state.params, inputs)
        if cfg.beta > 0:
            dev["ref_logp"] = steps.logprobs(state.ref_params, inputs)
        jax.block_until_ready(dev)
        t2 = time.perf_counter()
        state, m = steps.update(state, dev)
        metrics.update(update_metrics(to_host(m)))
        t3 = time.perf_counter()
        if cfg.beta > 0 and cfg.ref_refresh_steps and (step + 1) % cfg.ref_refresh_steps == 0:
            state = state.replace(ref_params=steps.refresh(state.params))
        metrics.update(time_logprob=t2 - t1, time_update=t3 - t2)
        return state, metrics, roll, batch


def prepare(cfg: GRPOConfig, devices=None) -> Session:
    """The mesh, model, tokenizer, rewards, prompts and compiled steps of a GRPO run, every check made
    before anything is compiled."""
    mesh, model_cfg, params = mesh_and_model(cfg, devices)
    check_mesh(cfg, model_cfg, rules_lib.mesh_sizes(mesh))
    tok = load_tokenizer(cfg.prompts.tokenizer, cfg.init_from)
    check_vocab(tok, model_cfg, cfg.init_from)
    reward_set = rewards_lib.reward_set(cfg.rewards)
    # Every process reads the whole prompt batch: rollouts are identical everywhere (see `rollout`).
    prompt_it = make_prompt_iterator(cfg.prompts, tok, shard=grain.sharding.NoSharding())
    tx = optimizer.build(cfg.optimizer, cfg.steps * optimizer_steps(cfg))  # the schedule counts optimizer steps
    abstract = jax.eval_shape(lambda p: init_state(p, tx, cfg), param_shapes(model_cfg))
    state_sh = rules_lib.state_shardings(abstract, param_shardings(model_cfg, mesh, cfg.mesh), mesh)
    batch_sh = batch_shardings(batch_shapes(cfg), mesh, cfg.mesh)
    steps = make_steps(model_cfg, cfg, tx, state_sh, batch_sh, mesh)
    return Session(cfg, mesh, model_cfg, params, tok, reward_set, prompt_it, tx, abstract, state_sh, batch_sh, steps)


def train_grpo(cfg: GRPOConfig, *, devices=None) -> RunResult:
    """Run (or resume) GRPO in cfg.out_dir on a mesh of `devices` (default: all) shaped by cfg.mesh.

    Rollout and training share one params pytree, laid out by the rules: the sampler runs on the
    training state's params where they lie, with the rows split over the batch axes."""
    s = prepare(cfg, devices)
    eval_prompts = None
    if cfg.eval_prompts is not None:
        eval_prompts = dataclasses.replace(cfg.eval_prompts, shard_index=0, shard_count=1)

    with Run(cfg, s.model_cfg, s.prompt_it, s.tok) as run, rules_lib.sharding_context(s.mesh, cfg.mesh):
        state, step = run.start(s.params, lambda p: init_state(p, s.tx, cfg), s.abstract, s.state_sh)
        s.params = None
        last = {}
        while step < cfg.steps:
            state, metrics, roll, batch = s.step(state, step)
            step += 1
            if batch is not None and run.primary and cfg.samples_every and (step % cfg.samples_every == 0 or step == 1):
                _write_samples(run.dir, step, roll, batch["advantages"])
            if not np.isfinite(metrics.get("loss", 0.0)):
                raise run.diverged(f"step {step}: GRPO loss is not finite")
            run.save(step, state)
            if eval_prompts is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
                summary, _ = evaluate_model(state.params, s.model_cfg, eval_prompts, s.tok,
                                            num_samples=cfg.eval_samples,
                                            temperature=0.0 if cfg.eval_samples == 1 else cfg.temperature,
                                            max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, mesh=s.mesh)
                metrics.update({f"eval/{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
            if run.log_due(step) or "eval/pass@1" in metrics:  # an evaluation is always logged
                run.log(step, metrics)
            last = metrics
            run.advance(reward=f"{metrics['reward/mean']:.3f}")
            if run.preempted(step, state):
                break
        run.end(step, state)
    return run.result(last)
