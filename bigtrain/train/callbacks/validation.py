"""Validation loss and perplexity on the held-out windows (`data.val`): before the first step,
every `eval.val_every` steps and at the end; data-parallel ranks share the windows."""

from __future__ import annotations

from bigtrain.data.build import build_val_data
from bigtrain.eval.perplexity import EvalResult, evaluate
from bigtrain.train.callbacks import Callback, Run


class Validation(Callback):
    def __init__(self) -> None:
        self.data = None
        self.first: EvalResult | None = None  # before the first update of this call
        self.last: EvalResult | None = None

    def setup(self, run: Run) -> None:
        self.data = build_val_data(run.cfg.data, run.cfg.data.seq_len)

    def start(self, run: Run) -> None:
        if run.step == 0:
            self.first = self.last = self.validate(run)

    def after_step(self, run: Run, ending: str | None) -> None:
        if run.step % run.cfg.eval.val_every == 0 or ending in ("done", "out_of_time"):
            self.last = self.validate(run)

    def validate(self, run: Run) -> EvalResult | None:
        if self.data is None:
            return None
        cfg, engine, comm = run.cfg, run.engine, run.comm
        result = evaluate(engine.eval_loss, self.data, cfg.data.micro_batch,
                          cfg.eval.val_batches * run.global_batch, comm.dp_rank, comm.dp_size, comm.sum_across_dp)
        run.log({"step": run.step, "tokens": run.tokens, "val_loss": result.loss, "val_perplexity": result.perplexity})
        return result
