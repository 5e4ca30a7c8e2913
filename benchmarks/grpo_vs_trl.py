"""GRPO steps/s and completion tokens/s: r1jax against TRL's GRPOTrainer on CPU, one process, one model.

Both load one HF directory written here: a random tiny Qwen2 (the shape of configs/model/tiny_qwen2_student.yaml)
with r1jax's built-in tokenizer. Both train on the same prompts (the built-in arithmetic task, in order),
with the same G, prompt and completion lengths, sampling temperature 1, reward (`distinct_chars`, below),
loss (r1jax `sequence_mean` = TRL `grpo`, β, ε, one optimizer step per rollout, TRL's KL without the ratio
weighting, as r1jax's default), Adam with the same learning rate and gradient clipping.

A step is one rollout and its update: sampling, the reward, π_ref's log-probs, the loss, backward and the
optimizer step. TRL runs `GRPOTrainer.training_step` (its generation, scoring and loss) plus the
optimizer step its Trainer loop would take; r1jax runs `grpo_loop.Session.step`, what `r1jax train` runs.
Blocks of `--steps` steps alternate r1jax, TRL, … (`--pairs`, after one warm-up block each, which holds
r1jax's compile; benchmarks/harness.py, which also pins both to the same CPUs); the table gives each
block's steps/s and completion tokens/s, then the median r1jax/TRL ratio, its spread ((max − min) /
median of the pair ratios; "NOISY" above 15%) and the load average before and after.

The loss after the same first update: one rollout of r1jax's (same prompt, completion and advantage
tensors on both sides), one update by each framework from the same weights, then the loss on that batch
with π_old the initial weights, computed by each.

    python benchmarks/grpo_vs_trl.py [--pairs 3] [--steps 3] [--prompts 4] [--generations 8] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # `grpo_vs_trl:distinct_chars` for r1jax's rewards

LR, BETA, EPS, SEED = 1e-4, 0.04, 0.2, 0


def distinct_chars(prompts, completions, **_):
    """A reward every random completion earns differently (GRPO needs reward variance); same in both."""
    return [len(set(c)) / max(len(c), 1) for c in completions]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="steps per timed block")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="CPUs for each side (default: all this process may use)")
    return ap.parse_args(argv)


def write_hf_dir(d: Path) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from r1jax.data.tokenizer import builtin_tokenizer

    torch.manual_seed(SEED)
    cfg = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6, rope_theta=10000.0,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=2, dtype="float32")
    Qwen2ForCausalLM(cfg).save_pretrained(d)
    builtin_tokenizer().save(d)
    return d


def r1jax_session(hf: Path, a, out: Path):
    from r1jax import config
    from r1jax.rl import grpo_loop

    cfg = config.load_stage(ROOT / "configs/train/tiny_grpo.yaml", [
        "model=null", f"init_from={hf}", f"prompts.tokenizer={hf}", f"out_dir={out}", "eval_prompts=null",
        "progress=false", "prompts.shuffle=false", f"prompts.batch_size={a.prompts}", f"prompts.seq_len={a.prompt_len}",
        f"num_generations={a.generations}", f"max_new_tokens={a.new_tokens}", "temperature=1.0",
        f"beta={BETA}", f"epsilon_low={EPS}", f"epsilon_high={EPS}", "loss_aggregation=sequence_mean",
        "num_iterations=1", "rollout_batches=1", f"optimizer.learning_rate={LR}", "optimizer.grad_clip_norm=1.0",
        "optimizer.weight_decay=0.0", "rewards=[{name: 'grpo_vs_trl:distinct_chars'}]", f"seed={SEED}",
        "mesh.data=1"])
    import jax

    return grpo_loop.prepare(cfg, jax.devices()[:1])


def prompt_texts(session, n_batches: int) -> list[str]:
    """The prompts r1jax's own iterator yields, in order, as the text TRL tokenizes back to the same ids."""
    import grain

    from r1jax.data.pipeline import make_prompt_iterator
    from r1jax.eval.run import prompt_rows

    it = make_prompt_iterator(session.cfg.prompts, session.tok, shard=grain.sharding.NoSharding())
    return [session.tok.decode(r) for _ in range(n_batches) for r in prompt_rows(next(it))]


def trl_trainer(hf: Path, prompts: list[str], a, out: Path):
    import datasets
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(hf)
    args = GRPOConfig(output_dir=str(out), per_device_train_batch_size=a.prompts * a.generations,
                      num_generations=a.generations, max_completion_length=a.new_tokens, temperature=1.0,
                      beta=BETA, epsilon=EPS, loss_type="grpo", use_bias_correction_kl=False, num_iterations=1,
                      learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
                      use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, shuffle_dataset=False,
                      seed=SEED, max_steps=10_000)
    trainer = GRPOTrainer(model=str(hf), reward_funcs=[distinct_chars], args=args,
                          train_dataset=datasets.Dataset.from_dict({"prompt": prompts}), processing_class=tok)
    trainer.create_optimizer_and_scheduler(num_training_steps=args.max_steps)
    trainer.current_gradient_accumulation_steps = 1  # what Trainer's loop sets before each step
    trainer.model.train()
    return trainer


class Blocks:
    """`block()` runs `steps` steps and records their completion tokens (one entry per block)."""

    def __init__(self, steps: int):
        self.steps, self.tokens = steps, []

    def block(self) -> None:
        self.tokens.append(sum(self.step() for _ in range(self.steps)))


class TRLSteps(Blocks):
    """TRL's training step (generation, rewards, loss, backward) and the optimizer step its loop takes."""

    def __init__(self, trainer, steps: int):
        super().__init__(steps)
        self.t, self.batches = trainer, iter(trainer.get_train_dataloader())

    def step(self) -> int:
        import torch

        t = self.t
        batch = next(self.batches)
        t.training_step(t.model, batch, None)
        torch.nn.utils.clip_grad_norm_(t.model.parameters(), t.args.max_grad_norm)
        t.optimizer.step()
        t.lr_scheduler.step()
        t.model.zero_grad()
        return int(t._buffered_inputs[0]["completion_mask"].sum())


class R1jaxSteps(Blocks):
    def __init__(self, session, steps: int):
        from r1jax.parallel import rules as rules_lib

        super().__init__(steps)
        self.s, self.n = session, 0
        self.ctx = lambda: rules_lib.sharding_context(session.mesh, session.cfg.mesh)
        with self.ctx():
            self.state = session.init_state()

    def step(self) -> int:
        with self.ctx():
            self.state, _, roll, _ = self.s.step(self.state, self.n)
        self.n += 1
        return int(roll.lengths.sum())


def loss_after_first_update(session, trainer) -> tuple[float, float, float]:
    """(r1jax, TRL, |relative difference|) of the loss on one r1jax rollout after one update from the
    same initial weights, π_old = those weights; then each one's gradient norm of that update."""
    import jax
    import numpy as np
    import torch

    from r1jax.parallel import rules as rules_lib
    from r1jax.rl import grpo, grpo_loop

    s = session
    with rules_lib.sharding_context(s.mesh, s.cfg.mesh):
        state = s.init_state()
        roll, _ = grpo_loop.rollout(state.params, s.model_cfg, s.cfg, s.prompt_it, s.tok, s.reward_set, 0, s.mesh)
        batch = grpo_loop.training_batch(roll, s.cfg, s.tok.eos_id)
        dev = grpo_loop.global_batch(batch, s.batch_sh)
        dev["ref_logp"] = s.steps.logprobs(state.ref_params, dict(dev))
        old = s.steps.logprobs(state.params, {k: v for k, v in dev.items() if k != "ref_logp"})
        state, m = s.steps.update(state, dev)
        r1_norm = float(m["grad_norm"][0])
        r1_loss, _ = jax.jit(grpo.loss_fn, static_argnums=(2, 3))(state.params, {**dev, "old_logp": old},
                                                                   s.model_cfg, s.cfg)
    # TRL: its model (the one GRPOTrainer set up) back at the directory's weights, the same tensors
    # (prompt left-padded, completion right-padded)
    from transformers import AutoModelForCausalLM

    t = trainer
    model = t.model
    fresh = AutoModelForCausalLM.from_pretrained(model.config._name_or_path, dtype=torch.float32)
    model.load_state_dict(fresh.state_dict())
    model.zero_grad()
    model.train()
    Lp = batch["tokens"].shape[1] - batch["completion_mask"].shape[1]
    comp_real = np.arange(batch["completion_mask"].shape[1])[None] < roll.lengths[:, None]
    inputs = {"prompt_ids": torch.tensor(batch["tokens"][:, :Lp], dtype=torch.long),
              "prompt_mask": torch.tensor(batch["segment_ids"][:, :Lp], dtype=torch.long),
              "completion_ids": torch.tensor(batch["tokens"][:, Lp:], dtype=torch.long),
              "completion_mask": torch.tensor(comp_real, dtype=torch.long),
              "advantages": torch.tensor(batch["advantages"], dtype=torch.float32),
              "ref_per_token_logps": torch.tensor(np.asarray(dev["ref_logp"]), dtype=torch.float32),
              "num_items_in_batch": torch.tensor(float(comp_real.sum()))}
    with torch.no_grad():
        logits_to_keep = inputs["completion_ids"].shape[1]
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        old_t, _, _ = t._get_per_token_logps_and_entropies(model, ids, mask, logits_to_keep)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, eps=s.cfg.optimizer.eps,
                            betas=(s.cfg.optimizer.b1, s.cfg.optimizer.b2))
    loss = t._compute_loss(model, inputs)
    loss.backward()
    trl_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
    opt.step()
    with torch.no_grad():
        trl_loss = float(t._compute_loss(model, {**inputs, "old_per_token_logps": old_t}))
    # the same gradient in float64: how much of the difference is float32 rounding
    model.load_state_dict(fresh.state_dict())
    model.double().zero_grad()
    t._compute_loss(model, {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}).backward()
    norm64 = float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")))
    model.float()
    r1 = float(r1_loss)
    return r1, trl_loss, abs(r1 - trl_loss) / max(abs(trl_loss), 1e-12), r1_norm, trl_norm, norm64


def main(argv=None):
    a = parse_args(argv)
    import harness

    threads = harness.pin_threads(a.threads)
    import jax

    jax.config.update("jax_platforms", "cpu")
    print(harness.header("benchmarks/grpo_vs_trl.py: GRPO steps, r1jax vs TRL's GRPOTrainer, one tiny Qwen2", threads))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hf = write_hf_dir(tmp / "qwen2")
        session = r1jax_session(hf, a, tmp / "r1jax")
        texts = prompt_texts(session, (a.pairs + 1) * a.steps + 2)
        trainer = trl_trainer(hf, texts, a, tmp / "trl")
        ids_r1 = [session.tok.encode(x) for x in texts[:4]]
        ids_trl = trainer.processing_class(text=texts[:4])["input_ids"]
        assert ids_r1 == ids_trl, "the two tokenizations of the prompts differ"
        print(f"model: tiny Qwen2 (hidden 64, 3 layers, vocab 512), {a.prompts} prompts x G={a.generations}, "
              f"{a.prompt_len}-token prompt bucket, {a.new_tokens} new tokens, beta={BETA}, sequence_mean/grpo; "
              f"{a.steps} steps per block; jax {jax.__version__}")
        r1, trl = R1jaxSteps(session, a.steps), TRLSteps(trainer, a.steps)
        cmp = harness.interleaved(r1.block, trl.block, a.pairs)  # the first block of each: warm-up (compile)
        first = loss_after_first_update(r1jax_session(hf, a, tmp / "r1jax_loss"), trainer)
    print()
    print("| pair | TRL steps/s | r1jax steps/s | ratio | TRL completion tok/s | r1jax completion tok/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for i, (ta, tb) in enumerate(zip(cmp.a_seconds, cmp.b_seconds)):
        print(f"| {i + 1} | {a.steps / tb:.3f} | {a.steps / ta:.3f} | {tb / ta:.2f}x | {trl.tokens[i + 1] / tb:.0f} "
              f"| {r1.tokens[i + 1] / ta:.0f} |")
    print(f"\nr1jax / TRL per step: {cmp.verdict()}")
    print(f"loss after the same first update: r1jax {first[0]:.6e}, TRL {first[1]:.6e}, relative difference "
          f"{first[2]:.1e}; the update's gradient norm: r1jax {first[3]:.6e}, TRL {first[4]:.6e} "
          f"(TRL in float64: {first[5]:.6e})")


if __name__ == "__main__":
    main()
