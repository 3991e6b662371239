"""Scaling-law tools: sweep plans, running them, collecting results, Chinchilla fits and plots."""
