"""lm-eval tasks (`eval.tasks`) on the current weights: before the first step, every `eval.every`
steps and at the end; rank 0 logs `eval/<task>/<metric>`."""

from __future__ import annotations

from bigtrain.train.callbacks import Callback, Run


class EvalTasks(Callback):
    def __init__(self) -> None:
        self.tasks = None

    def setup(self, run: Run) -> None:
        """Resolve and load the tasks now: a bad task name fails before the first step."""
        from bigtrain.eval.harness import TrainingTasks  # imports lm-eval: only when asked for

        self.tasks = TrainingTasks(run.cfg.eval, run.cfg.model.max_seq_len, run.engine, run.comm,
                                   run.tokenizer_path)

    def start(self, run: Run) -> None:
        if run.step == 0:
            self.evaluate(run)

    def after_step(self, run: Run, ending: str | None) -> None:
        if run.step % run.cfg.eval.every == 0 or ending in ("done", "out_of_time"):
            self.evaluate(run)

    def evaluate(self, run: Run) -> None:
        metrics = self.tasks.run()
        if metrics is not None:
            run.log({"step": run.step, "tokens": run.tokens, **metrics})
