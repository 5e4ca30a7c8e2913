"""The `r1jax` command. Thin: parse arguments, build configs, call library functions."""

from __future__ import annotations

import argparse
import sys

from r1jax.errors import R1JaxError


def _demo(args) -> int:
    from r1jax.demo import run_demo

    run_demo(args.out)
    return 0


def _train(args) -> int:
    from r1jax.config import load_stage
    from r1jax.train.loop import train

    cfg = load_stage(args.config, args.overrides)
    result = train(cfg)
    print(f"r1jax train: {result.status} at step {result.step}; run directory {result.run_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="r1jax", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the main job on its embedded default (no downloads)")
    demo.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    demo.set_defaults(func=_demo)
    train = sub.add_parser("train", help="train a stage (pretrain, sft, ...) from a YAML config")
    train.add_argument("config", help="YAML config (the `stage` key picks the stage)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optimizer.learning_rate=1e-3")
    train.set_defaults(func=_train)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except R1JaxError as e:
        print(f"r1jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
