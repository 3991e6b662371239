"""The training loop: data → engine step → metrics, periodic validation and checkpoints, resume."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from bigtrain.checkpoint import io as ckpt
from bigtrain.checkpoint.mirror import CheckpointMirror
from bigtrain.checkpoint.writes import Direct, Staged
from bigtrain.config import Config, DataConfig, TrainConfig, save_config
from bigtrain.data.build import build_train_loader, check_remote_data
from bigtrain.data.prefetch import Prefetcher
from bigtrain.data.seq_len_warmup import cut_windows, window_length
from bigtrain.data.tokenizer import TextTokenizer
from bigtrain.distributed import agreement, heartbeat
from bigtrain.distributed.topology import init_processes, process_env
from bigtrain.engine.contract import Engine, StepOutput
from bigtrain.engine.device import (
    deterministic_enabled,
    pick_device,
    resolve_precision,
)
from bigtrain.engine.local import local_engine
from bigtrain.engine.materialize import Materializer
from bigtrain.engine.memory import peak_memory_gb
from bigtrain.engine.update_gate import UpdateGate
from bigtrain.errors import BigtrainError
from bigtrain.eval.perplexity import EvalResult
from bigtrain.model import Llama, flops_per_token
from bigtrain.model.llama import DocumentMasking
from bigtrain.parallel.layout import check_layout
from bigtrain.train.callbacks import Callback
from bigtrain.train.callbacks.bad_steps import BadSteps
from bigtrain.train.callbacks.eval_tasks import EvalTasks
from bigtrain.train.callbacks.garbage_collection import GarbageCollection
from bigtrain.train.callbacks.mirror import Mirror
from bigtrain.train.callbacks.router import RouterMetrics
from bigtrain.train.callbacks.validation import Validation
from bigtrain.train.host_memory import reuse_freed_memory
from bigtrain.train.metrics import SpeedMeter, directory_size, peak_flops
from bigtrain.train.run_lock import run_lock
from bigtrain.train.schedule import lr_at
from bigtrain.train.signals import StopRequest
from bigtrain.train.sinks import Sinks


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    losses: list[float]  # the training loss of every step this call ran
    checkpoint: Path | None
    val: EvalResult | None
    first_val: EvalResult | None  # validation before the first update of this call
    wall_s: float
    is_main: bool  # rank 0, which logs and reports
    preempted: bool = False  # stopped early by SIGUSR1/SIGTERM after saving a checkpoint


def set_determinism(seed: int, cfg: TrainConfig) -> None:
    """Seed torch; `train.deterministic` picks deterministic kernels. torch's debugging aid that fills
    every new uninitialized tensor with NaN stays off: no kernel here reads memory it has not
    written, and the fill cost DeepSpeed ZeRO-1 a third of its CPU step (it allocates fresh flat
    buffers every step)."""
    torch.manual_seed(seed)
    deterministic = deterministic_enabled(cfg.deterministic, pick_device(cfg.device))
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False


def find_resume_checkpoint(cfg: Config, mirror: CheckpointMirror | None = None) -> Path | None:
    """The local checkpoint to start from; refuse to start over a run that already has checkpoints,
    here or in its `mirror`. With run.resume=auto and no local checkpoint, the caller fetches the
    mirror's latest. Rank 0 decides this once for every rank (`agreement.from_main`)."""
    run_dir, resume = cfg.run.path, cfg.run.resume
    if resume == "auto":
        return ckpt.latest_checkpoint(run_dir)
    if resume:
        return ckpt.resolve_checkpoint(resume)  # checked by every rank as it loads
    if ckpt.latest_checkpoint(run_dir) is not None:
        raise BigtrainError(
            f"{run_dir} already has checkpoints; pass run.resume=auto to continue it or choose another run.name"
        )
    if mirror is not None and mirror.reached is not None:
        raise BigtrainError(f"checkpoint.remote={mirror.url} already has checkpoints (latest {mirror.reached}); "
                            "pass run.resume=auto to continue from it or choose another checkpoint.remote")
    return None


def build_engine(cfg: Config, gate: UpdateGate, init_from: str | None = None) -> Engine:
    """The local engine for one process, else DeepSpeed over the launched processes; the model
    starts from the weights of checkpoint `init_from` when given (checked once, by rank 0).
    This rank's layers are built on the meta device; `parallelize` cuts and materialises each
    (seeded by `run.seed` and the parameter's name), then the engine wraps them."""
    init_file = agreement.from_main(lambda: ckpt.initial_weights_file(init_from, cfg.model)) if init_from else None
    if cfg.parallel.engine == "local":
        materialize = Materializer(cfg.model, pick_device(cfg.train.device), cfg.run.seed, init_file)
        return local_engine(Llama(cfg.model, device="meta"), cfg.train, cfg.parallel, gate, materialize)
    if pick_device(cfg.train.device).type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed picks its accelerator when first imported
    from bigtrain.engine.deepspeed.engine import build_deepspeed_engine  # imports DeepSpeed: slow
    from bigtrain.engine.deepspeed.grid import init_topology

    return build_deepspeed_engine(cfg, init_topology(cfg), gate, init_file)


def document_masking(data: DataConfig, tokenizer: Path) -> DocumentMasking | None:
    """How the engine finds documents in windows under `data.document_masking`: they end with the
    EOS token of `tokenizer` (the data's), as `prepare` writes every document."""
    if not data.document_masking:
        return None
    if not Path(tokenizer).is_file():
        raise BigtrainError(f"data.document_masking needs the data's tokenizer (its EOS token): {tokenizer} is missing")
    return DocumentMasking(TextTokenizer.load(tokenizer).eos_id, data.reset_positions)


def train(cfg: Config, console: bool = True, stop: StopRequest | None = None,
          callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train `cfg.model` on `cfg.data` with the configured engine, resuming if asked.

    The processes start first (`init_processes`: the process group ends at interpreter exit), then
    every rank waits for rank 0 to hold the run directory's lock (`run.lock`, `run.wait_lock`)
    before anything in it is read. A signal before the loop starts ends the process at once;
    SIGUSR1/SIGTERM during training (caught by `stop`, or from this call on) make it save at the
    next logging step and return with `preempted` set. `callbacks` run after the built-in ones
    (`bigtrain/train/callbacks/`), their state saved in and restored from checkpoints. When another
    rank dies or freezes, the process group is broken: this process prints one line naming that
    rank and exits (status 1) at once."""
    check_layout(cfg, process_env().world_size)  # before touching data or starting processes
    resolve_precision(cfg.train.precision, pick_device(cfg.train.device), cfg.parallel.engine)  # and before any model
    check_remote_data(cfg.data)  # an unreadable bucket fails here, before processes or the model
    with (contextlib.nullcontext(stop) if stop else StopRequest()) as stop:
        try:
            if cfg.parallel.engine == "deepspeed":
                init_processes(cfg)
            with run_lock(cfg.run.path, cfg.run.wait_lock, enabled=cfg.run.lock):
                return _run_reporting_failures(Trainer(cfg, console, stop, callbacks))
        except heartbeat.PeersLost as e:  # the process group is broken: leave without waiting on it
            heartbeat.leave(e)


def _run_reporting_failures(trainer: Trainer) -> TrainResult:
    try:
        return trainer.run()
    except heartbeat.PeersLost:
        raise
    except BigtrainError as e:  # the other ranks name this rank and its line, not a broken collective
        heartbeat.report_error(str(e))
        raise
    except (RuntimeError, OSError) as e:  # a collective failed or timed out: was a rank lost?
        heartbeat.check_peers(e)
        raise


class Trainer:
    """One training run: its engine, data and callbacks, and the loop over them. The loop owns the
    step, logging, saving and stopping; every other feature is a callback with its own cadence."""

    def __init__(self, cfg: Config, console: bool, stop: StopRequest, callbacks: Sequence[Callback] = ()):
        self.started = time.perf_counter()
        self.cfg, self.stop, self.run_dir = cfg, stop, cfg.run.path
        set_determinism(cfg.run.seed, cfg.train)
        if cfg.train.reuse_host_memory:
            reuse_freed_memory()
        self.sinks, self.bad, self.validation = Sinks(cfg, console), BadSteps(cfg), Validation()
        self.mirror = Mirror(cfg.checkpoint) if cfg.checkpoint.remote else None
        self.callbacks: list[Callback] = [self.sinks, self.bad, self.validation, *([EvalTasks()] if cfg.eval.tasks else []),
                                          *([self.mirror] if self.mirror else []),
                                          *([RouterMetrics()] if cfg.model.moe.experts else []),
                                          *([GarbageCollection()] if cfg.train.manual_gc else []), *callbacks]
        remote = self.mirror.mirror if self.mirror else None
        resume_from = agreement.from_main(lambda: find_resume_checkpoint(cfg, remote))  # one point for all
        from_remote = resume_from is None and cfg.run.resume == "auto" and remote and remote.reached
        self.engine = engine = build_engine(cfg, self.bad.gate, None if resume_from or from_remote else cfg.model.init_from)
        self.comm = engine.comm
        if self.mirror and cfg.run.resume == "auto":
            resume_from = self.mirror.resume_from(self, resume_from)
        self.loader = build_train_loader(cfg.data, cfg.data.micro_batch, cfg.train.grad_accum, dp_rank=self.comm.dp_rank,
                                         dp_size=self.comm.dp_size, seed=cfg.run.seed,
                                         model_vocab_size=cfg.model.vocab_size)
        if cfg.data.prefetch:
            self.loader = Prefetcher(self.loader, pin_memory=engine.device.type == "cuda")
        engine.documents = document_masking(cfg.data, self.loader.tokenizer_path)
        self.global_batch, self.tokenizer_path = self.loader.global_batch, self.loader.tokenizer_path
        for callback in self.callbacks:
            callback.setup(self)
        self.step, self.tokens = 0, 0
        if resume_from is not None:
            self._resume(resume_from)
        if self.comm.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        self.tokens_per_step = self.global_batch * cfg.data.seq_len
        self.speed = SpeedMeter(self.tokens_per_step, flops_per_token(cfg.model, cfg.data.seq_len),
                                self.comm.world_size, peak_flops(engine.device, cfg.log.peak_tflops))
        self.losses: list[float] = []  # every step's loss, averaged over data-parallel ranks at logging time
        self.window_losses: list[torch.Tensor] = []  # this rank's, since the last log
        self.last_saved: Path | None = None
        self.writes = Staged() if cfg.checkpoint.async_save else None  # its host buffers serve every save
        self.saving: ckpt.PendingSave | None = None  # the save in flight
        self.window_steps, self.window_flops = 0, 0.0  # steps and their FLOPs per token since the last log
        self.first_record = True

    def _resume(self, checkpoint: Path) -> None:
        ckpt.check_same_model(checkpoint, self.cfg.model)
        state = ckpt.load_checkpoint(checkpoint, self.engine, self.comm, verify=self.cfg.checkpoint.verify)
        self.loader.load_state_dict(state["loader"])
        self.step, self.tokens = state["step"], state["tokens"]
        for callback in self.callbacks:
            callback.load_state_dict(state)

    def log(self, record: dict) -> None:
        self.sinks.log(record)

    def run(self) -> TrainResult:
        cfg = self.cfg
        self.stop.defer()  # from here on a signal means: checkpoint at the next logging step
        ending = None
        try:
            for callback in self.callbacks:
                callback.start(self)
            self.window_start = time.perf_counter()  # the first window starts with the first step
            while self.step < cfg.train.steps and ending not in ("out_of_time", "preempted"):
                out = self.train_step()
                ending = self.ending()
                if self.step % cfg.log.every == 0 or ending:
                    self.log_step(out)
                if self.bad.rollback_due(self, saving=self.step % cfg.checkpoint.every == 0 or bool(ending)):
                    self.roll_back()  # a stop request still pending is seen at the next logging step
                    ending = None
                    continue
                paused = time.perf_counter()  # validation, evaluation and saving do not count as step time
                for callback in self.callbacks:
                    callback.after_step(self, ending)
                if self.step % cfg.checkpoint.every == 0 or ending:
                    self.save(wait=ending is not None)
                self.window_start += time.perf_counter() - paused
            self.finish_save()
            for callback in self.callbacks:
                callback.end(self)
        finally:
            for callback in self.callbacks:
                callback.close()
        if ending == "preempted":
            self.comm.barrier()  # leave together: torchrun stops the other workers when one exits
        return TrainResult(
            run_dir=self.run_dir, step=self.step, tokens=self.tokens, losses=self.losses,
            checkpoint=self.last_saved or ckpt.latest_checkpoint(self.run_dir), val=self.validation.last,
            first_val=self.validation.first, wall_s=time.perf_counter() - self.started, is_main=self.comm.is_main,
            preempted=ending == "preempted",
        )

    def roll_back(self) -> None:
        """Too many bad steps in a row: every rank reloads the latest checkpoint, and the data of
        the bad steps is skipped when the run gets there again (`BadSteps.plan_rollback`)."""
        self.finish_save()  # an asynchronous save in flight is the latest good checkpoint once complete
        checkpoint = agreement.from_main(lambda: ckpt.latest_checkpoint(self.run_dir))
        self.bad.plan_rollback(self, checkpoint)
        self._resume(checkpoint)
        self.window_losses, self.window_steps, self.window_flops = [], 0, 0.0
        self.window_start = time.perf_counter()

    def _skip_data(self) -> None:
        """Draw and discard the batches a rollback skips at this step (`data_skips.json`)."""
        skip = self.bad.skips.steps_at(self.step)
        for _ in range(skip):
            self.loader.next_step()
        if skip:
            self.log({"step": self.step, "skipped_data_from_step": self.step, "skipped_data_steps": skip})

    def train_step(self) -> StepOutput:
        length = window_length(self.step, self.cfg.data)
        with self.engine.timer.phase("data", host=True):
            self._skip_data()
            batches = [cut_windows(batch, length) for batch in self.loader.next_step()]
        out = self.engine.train_step(batches, lr_at(self.step, self.cfg.train))
        self.window_flops += flops_per_token(self.cfg.model, length)
        self.step, self.tokens, self.window_steps = self.step + 1, self.tokens + self.tokens_per_step, self.window_steps + 1
        self.window_losses.append(out.loss)
        for callback in self.callbacks:
            callback.step_end(self, out)
        return out

    def ending(self) -> str | None:
        """Why the loop ends after this step: `done`, `out_of_time` (train.max_minutes),
        `preempted` (SIGUSR1/SIGTERM), or None. Every rank gets the same answer. Time and signals
        are checked (a collective) at logging steps only, so a notice is honoured within log.every steps."""
        if self.step == self.cfg.train.steps:
            return "done"
        if self.step % self.cfg.log.every:
            return None
        max_minutes = self.cfg.train.max_minutes
        out_of_time = max_minutes is not None and self.comm.any_rank(
            time.perf_counter() - self.started > 60 * max_minutes)
        if self.comm.any_rank(self.stop.requested):
            return "preempted"
        return "out_of_time" if out_of_time else None

    def log_step(self, out: StepOutput) -> None:
        """One training record (the losses reach the host only here), then the callbacks that act on it."""
        window_s = time.perf_counter() - self.window_start
        engine = self.engine
        losses = torch.stack(self.window_losses)  # one collective for the whole window
        self.losses += (losses if engine.loss_is_global else self.comm.mean_over_dp(losses)).tolist()
        self.window_losses = []
        z_loss = engine.take_z_loss()  # the objective's other term (train.z_loss): not part of `loss`
        record = {
            "step": self.step, "loss": self.losses[-1], **({"z_loss": z_loss} if z_loss is not None else {}),
            "lr": lr_at(self.step - 1, self.cfg.train),
            "grad_norm": float(out.grad_norm), "tokens": self.tokens,
            **self.speed.measure(self.window_steps, window_s, engine.step_times(), self.window_flops / self.window_steps),
            "peak_mem_gb": peak_memory_gb(engine.device),
            "fp16_overflow_steps": out.overflow_steps, "loss_scale": out.loss_scale,
        }
        if self.first_record:  # once per process: what building the model took, beside the step's peak
            record["construct_peak_gb"], self.first_record = engine.construct_peak_gb, False
        if self.cfg.data.seq_len_warmup is not None:
            record["seq_len"] = window_length(self.step - 1, self.cfg.data)
        for callback in self.callbacks:
            record.update(callback.metrics(self))
        self.log(record)
        for callback in self.callbacks:
            callback.logged(self)
        if self.saving is not None and not self.comm.any_rank(not self.saving.done()):
            self.finish_save()
        self.window_start, self.window_steps, self.window_flops = time.perf_counter(), 0, 0.0

    def save(self, wait: bool) -> None:
        """Checkpoint this step. The loop waits for every file to be written, or with
        `checkpoint.async` only for the copy into host memory (`checkpoint_stall_s`): the files are
        then written in the background, and the save is finished at a logging step where every
        rank is done, before the next save, or at once when `wait` (the last save of a run)."""
        self.finish_save()  # one save in flight at a time
        for callback in self.callbacks:
            callback.before_save(self)
        state = {"tokens": self.tokens, "loader": self.loader.state_dict()}
        for callback in self.callbacks:
            state.update(callback.state_dict())
        if self.writes is not None:
            self.writes.begin()
        save = self.saving = ckpt.begin_save(self.run_dir, self.step, self.engine, self.comm, state, self.cfg,
                                             self.tokenizer_path, self.cfg.checkpoint.keep_last, self.writes or Direct())
        if self.writes is None:
            save.write_together(self.comm)
            save.stall_s = save.written_s = time.perf_counter() - save.began
        else:
            self.writes.staged()
            save.write_in_background()
            save.stall_s = time.perf_counter() - save.began
        if wait or self.writes is None:
            self.finish_save()

    def finish_save(self) -> None:
        """Meet the save in flight, if any (every rank together): log it, hand it to the callbacks."""
        save, self.saving = self.saving, None
        if save is None:
            return
        path = self.last_saved = save.finish(self.comm)
        if self.comm.is_main:
            self.log({"step": self.step, "checkpoint": path.name, "checkpoint_stall_s": save.stall_s,
                      "checkpoint_write_s": save.written_s, "checkpoint_gb": directory_size(path) / 2**30})
        for callback in self.callbacks:
            callback.saved(self, path)
