"""The `r1jax` command. Thin: parse arguments, build configs, call library functions.

Errors: a typed r1jax error, an OSError (a full disk: ENOSPC) and a failure inside tensorstore, orbax
or the GCS clients (gcsfs, google-auth) end the command with one line, `r1jax <command>: error: <path>: <cause>`, and exit status 2. The
traceback, and the background threads' own reports of the failure, are shown only with
`R1JAX_DEBUG=1` in the environment. Anything else is a bug and keeps its traceback."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import traceback

from r1jax.errors import R1JaxError, chain, describe

DEBUG_ENV = "R1JAX_DEBUG"
# Failures raised in them are the storage's, not ours (gcsfs and google-auth: gs:// paths, docs/storage.md).
_STORAGE_PACKAGES = ("orbax", "tensorstore", "gcsfs", "google")


def _demo(args) -> int:
    from r1jax.demo import run_demo

    run_demo(args.out)
    return 0


def _train(args) -> int:
    from r1jax.config import load_stage
    from r1jax.train.loop import train

    cfg = load_stage(args.config, args.overrides)
    if cfg.stage == "grpo":
        from r1jax.rl.grpo_loop import train_grpo

        result = train_grpo(cfg)
    else:
        result = train(cfg)
    print(f"r1jax train: {result.status} at step {result.step}; run directory {result.run_dir}")
    return 0


def _sample(args) -> int:
    from r1jax.sample import sample_file

    n = sample_file(args.ckpt, args.prompts, args.out, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                    num_samples=args.num_samples, batch_size=args.batch_size, cache=args.cache)
    print(f"wrote {n} samples to {args.out}")
    return 0


def _pipeline(args) -> int:
    from r1jax.eval.metrics import format_table
    from r1jax.pipeline import load_pipeline, run_pipeline

    records = run_pipeline(load_pipeline(args.config, args.overrides))
    rows = [{"stage": r["name"], "kind": r["kind"], **r.get("eval", {}), "seconds": r["seconds"]} for r in records]
    print(format_table(rows))
    return 0


def _plan(args) -> int:
    from r1jax.plan import plan_command

    plan_command(args.config, args.overrides, args.mesh, devices=args.devices, hardware=args.hardware,
                 batch_size=args.batch, seq_len=args.seq_len, compile=not args.no_compile,
                 topology=args.topology, slices=args.slices, sampler=not args.no_sampler,
                 sample_batch=args.sample_batch, sample_len=args.sample_len, sample_new=args.sample_new)
    return 0


def _eval(args) -> int:
    from r1jax.config import EvalConfig, load
    from r1jax.eval.run import run_eval

    run_eval(load(EvalConfig, args.config, args.overrides))
    return 0


def _resolved_config(path, overrides):
    """The config dataclass a YAML file is, with `overrides` applied: a stage (`stage:`), a pipeline
    (`stages:`), an eval config (`verifier:`, `num_samples:` or `ks:`), else a model."""
    from r1jax import config as config_lib

    raw = config_lib.read_yaml(path)
    if "stage" in raw:
        return config_lib.load_stage(path, overrides)
    if "stages" in raw:
        from r1jax.pipeline import load_pipeline

        return load_pipeline(path, overrides)
    if {"verifier", "num_samples", "ks"} & set(raw):
        return config_lib.load(config_lib.EvalConfig, path, overrides)
    return config_lib.model_from_dict(config_lib.apply_overrides(raw, list(overrides)))


def _config_show(args) -> int:
    from r1jax.config import PipelineConfig
    from r1jax.config.show import show

    cfg = _resolved_config(args.config, args.overrides)
    if not isinstance(cfg, PipelineConfig):
        print(show(cfg), end="")
        return 0
    from r1jax.pipeline import resolve_stage

    # Each stage as it runs: its own config with the pipeline's defaults, out_dir and @references filled in.
    print(show(cfg, skip=("stages",)), end="")
    for i, spec in enumerate(cfg.stages):
        print(f"\n# stages[{i}]: {spec.name} ({spec.kind}), resolved\n" + show(resolve_stage(cfg, i)), end="")
    return 0


def _version() -> str:
    from importlib import metadata

    try:
        return f"r1jax {metadata.version('r1jax')}"
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "r1jax (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="r1jax", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the main job on its embedded default (no downloads)")
    demo.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    demo.set_defaults(func=_demo)
    train = sub.add_parser("train", help="train a stage (pretrain, sft, ...) from a YAML config")
    train.add_argument("config", help="YAML config (the `stage` key picks the stage)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optimizer.learning_rate=1e-3")
    train.set_defaults(func=_train)
    from r1jax.convert.commands import add_convert_parser

    add_convert_parser(sub)
    pipeline = sub.add_parser("pipeline", help="run several stages in order (the R1 recipe) from one YAML")
    pipeline.add_argument("config")
    pipeline.add_argument("overrides", nargs="*", metavar="key=value")
    pipeline.set_defaults(func=_pipeline)
    ev = sub.add_parser("eval", help="pass@k / maj@k of a model on a verifiable prompt set")
    ev.add_argument("config", help="eval YAML (see configs/eval/)")
    ev.add_argument("overrides", nargs="*", metavar="key=value",
                    help="dotted overrides, e.g. num_samples=8 verifier=package.module:function")
    ev.set_defaults(func=_eval)
    plan = sub.add_parser("plan", help="per-device memory of a config on a (virtual) mesh, without the hardware")
    plan.add_argument("config", help="a stage YAML or a model YAML")
    plan.add_argument("overrides", nargs="*", metavar="key=value")
    plan.add_argument("--mesh", default=None, help="mesh axes, e.g. data=2,fsdp=32,expert=8")
    plan.add_argument("--devices", type=int, default=None, help="device count (default: the mesh's product)")
    plan.add_argument("--hardware", default=None, help="device kind for the fit check, e.g. h100, v5p")
    plan.add_argument("--batch", type=int, default=None, help="global batch rows")
    plan.add_argument("--seq-len", type=int, default=None)
    plan.add_argument("--no-compile", action="store_true", help="analytic estimate only")
    plan.add_argument("--topology", default=None,
                      help="compile with XLA:TPU for this TPU slice on this host (needs libtpu): a slice name "
                           "(v5p-128, v4-32, v5e-16, v6e-64) or a topology (v5p:4x4x4, v5e:4x4)")
    plan.add_argument("--slices", type=int, default=1, help="with --topology: that many slices over DCN")
    plan.add_argument("--sample-batch", type=int, default=None,
                      help="with --topology, a train config: rows the sampler is planned for (default: the data batch)")
    plan.add_argument("--sample-len", type=int, default=None,
                      help="with --topology, a train config: prompt + new tokens per sampled row (default: seq_len)")
    plan.add_argument("--sample-new", type=int, default=None,
                      help="with --topology, a train config: new tokens of the --sample-len (default: half of it)")
    plan.add_argument("--no-sampler", action="store_true",
                      help="with --topology: compile the train step (GRPO: its update) only, not the sampler")
    plan.set_defaults(func=_plan)
    sample = sub.add_parser("sample", help="sample completions for a jsonl of prompts")
    sample.add_argument("--ckpt", required=True, help="Hugging Face model directory or r1jax checkpoint")
    sample.add_argument("--prompts", required=True,
                        help='jsonl of {"prompt_ids": [...]}, {"prompt": "text"} or {"messages": [...]} (text and '
                             'messages need a tokenizer in --ckpt; messages go through its chat template)')
    sample.add_argument("--out", required=True, help="output jsonl, one row per sample")
    sample.add_argument("--max-new-tokens", type=int, default=256)
    sample.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    sample.add_argument("--top-p", type=float, default=1.0)
    sample.add_argument("--top-k", type=int, default=0, help="0 = off")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--num-samples", type=int, default=1, help="completions per prompt")
    sample.add_argument("--batch-size", type=int, default=16)
    sample.add_argument("--cache", choices=["latent", "expanded", "gqa"], default=None,
                        help="KV cache: latent or expanded (DeepSeek), gqa (dense students); default: the "
                             "model's own (latent, gqa)")
    sample.set_defaults(func=_sample)
    config = sub.add_parser("config", help="inspect configs")
    config_sub = config.add_subparsers(dest="action", required=True)
    show = config_sub.add_parser("show", help="print the resolved config: every field, its value and its default")
    show.add_argument("config", help="a stage, pipeline, eval or model YAML")
    show.add_argument("overrides", nargs="*", metavar="key=value")
    show.set_defaults(func=_config_show)
    return parser


def _override_hints(argv: list[str], unknown: list[str]) -> str | None:
    """For flags argparse does not know, given as `--key value` or `--key=value` where a command
    takes `key=value` overrides: the error that says how to write them."""
    hints = []
    for flag in unknown:
        if not flag.startswith("--") or len(flag) == 2:
            continue
        key, eq, value = flag[2:].partition("=")
        if not eq:
            i = argv.index(flag)
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            value = nxt if nxt is not None and not nxt.startswith("-") and "=" not in nxt else "VALUE"
        hints.append(f"{flag}{'' if eq else ' ' + value if value != 'VALUE' else ''}: overrides are written "
                     f"key=value, without dashes: {key.replace('-', '_') if '.' not in key else key}={value}")
    return "; ".join(hints) or None


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _raised_in(e: BaseException | None, packages) -> bool:
    """Whether `e`, or an error it was raised from or while handling, is of or was raised in `packages`."""
    return any(type(x).__module__.split(".")[0] in packages
               or any(f"{os.sep}{p}{os.sep}" in f.f_code.co_filename
                      for f, _ in traceback.walk_tb(x.__traceback__) for p in packages) for x in chain(e))


def _from_storage(e: BaseException) -> bool:
    """An OSError, or an error raised inside orbax or tensorstore (tensorstore's are plain ValueErrors
    raised from orbax's frames), anywhere in the chain of `e`."""
    return any(isinstance(x, OSError) for x in chain(e)) or _raised_in(e, _STORAGE_PACKAGES)


class _NoTracebacks(logging.Filter):
    """Drops the records that carry a traceback (orbax's and asyncio's reports of the failed write the
    command reports itself)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.exc_info is None or record.exc_info == (None, None, None)


# Where the background reports of a failed write come from: orbax's threads and its coroutines, which
# asyncio finalizes (also while the interpreter shuts down).
_BACKGROUND = _STORAGE_PACKAGES + ("asyncio",)


def _quiet_background_failures() -> None:
    """A failed write leaves orbax's threads and coroutines to print their own tracebacks, also while
    the interpreter shuts down; the command reports the failure once, so those are dropped (kept with
    R1JAX_DEBUG=1). Other threads' errors are printed as before."""
    for name in ("absl", "asyncio", "orbax"):
        logging.getLogger(name).addFilter(_NoTracebacks())
    unraisable, thread = sys.unraisablehook, threading.excepthook

    def quiet_unraisable(u):
        code = getattr(u.object, "cr_code", None) or getattr(u.object, "__code__", None)
        where = getattr(code, "co_filename", "")
        if not (_raised_in(u.exc_value, _BACKGROUND) or any(f"{os.sep}{p}{os.sep}" in where for p in _BACKGROUND)):
            unraisable(u)

    def quiet_thread(args):
        if not _raised_in(args.exc_value, _BACKGROUND):
            thread(args)

    sys.unraisablehook, threading.excepthook = quiet_unraisable, quiet_thread


def _destination(args) -> str | None:
    """The path a command writes (its message leads with it when the failure is in a file under it,
    such as convert's temporary directory)."""
    for name in ("dst", "out"):
        if getattr(args, name, None):
            return str(getattr(args, name))
    return None


def main(argv=None) -> int:
    """Run the command of `argv` (default: sys.argv) and return its exit status. As the process's own
    command (argv None) it also silences the background reports of a failure (see the module doc);
    a caller passing argv keeps its process's hooks and logging as they are."""
    parser = build_parser()
    argv_list = list(sys.argv[1:] if argv is None else argv)
    args, unknown = parser.parse_known_args(argv_list)
    if unknown:
        hint = _override_hints(argv_list, unknown) if hasattr(args, "overrides") else None
        parser.error(hint or f"unrecognized arguments: {' '.join(unknown)}")
    debug = _debug()
    if argv is None and not debug:
        _quiet_background_failures()
    hint = ""
    try:
        return args.func(args)
    except R1JaxError as e:
        failure, message = e, str(e)
    except Exception as e:
        if not _from_storage(e):
            raise
        failure, message, where = e, describe(e), _destination(args)
        if where is not None and where not in message:
            message = f"{where}: not written ({message})"
        hint = "" if debug else f" (the traceback: {DEBUG_ENV}=1)"
    if debug:
        traceback.print_exception(failure)
    print(f"r1jax {args.command}: error: {message}{hint}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
