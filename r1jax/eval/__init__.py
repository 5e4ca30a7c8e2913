"""Evaluation on verifiable tasks: pass@1, unbiased pass@k, maj@k."""

from r1jax.eval.metrics import (evaluate, format_table, maj_at_k, majority_vote, pass_at_k, results_table,
                                score_problem, write_jsonl)

__all__ = ["evaluate", "format_table", "maj_at_k", "majority_vote", "pass_at_k", "results_table",
           "score_problem", "write_jsonl"]
