"""Data: tokenizer and R1 chat format (`tokenizer`), the built-in verifiable task (`tasks`), grain
sources (`sources`), rows to examples (`examples`), packing (`packing`), and the pipeline that turns a
DataConfig into numpy batches for pre-training, SFT and RL prompts (`pipeline`).

The package re-exports nothing: its modules import one another, and a package that imported them here
would sit in the middle of every such import."""
