"""bigtrain: pretrain Llama-style language models, from one CPU to Slurm clusters."""

__version__ = "0.1.0"
