"""The training loop: data → engine step → metrics, periodic validation and checkpoints, resume."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bigtrain.checkpoint import io as ckpt
from bigtrain.checkpoint.mirror import CheckpointMirror
from bigtrain.config import Config, TrainConfig, save_config
from bigtrain.data.build import build_train_loader, build_val_data, check_remote_data
from bigtrain.data.prefetch import Prefetcher
from bigtrain.distributed import agreement, heartbeat
from bigtrain.distributed.timing import PhaseTimer
from bigtrain.distributed.topology import init_processes, process_env
from bigtrain.engine.contract import Engine, StepOutput
from bigtrain.engine.device import (
    deterministic_enabled,
    pick_device,
    rank_device,
    resolve_precision,
)
from bigtrain.engine.local import LocalEngine, parallelize_local
from bigtrain.engine.update_gate import UpdateGate
from bigtrain.errors import BigtrainError
from bigtrain.eval.perplexity import EvalResult, evaluate
from bigtrain.model import Llama, flops_per_token
from bigtrain.parallel.layout import check_layout
from bigtrain.train.bad_steps import BadSteps
from bigtrain.train.host_memory import reuse_freed_memory
from bigtrain.train.metrics import SpeedMeter, directory_size, peak_flops, peak_memory_gb
from bigtrain.train.run_lock import run_lock
from bigtrain.train.schedule import lr_at
from bigtrain.train.signals import StopRequest
from bigtrain.train.sinks import Sinks, build_sinks


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


def build_engine(cfg: Config, init_from: str | None = None) -> Engine:
    """The local engine for one process, else DeepSpeed over the launched processes; the model
    starts from the weights of checkpoint `init_from` when given (checked once, by rank 0).
    Build this rank's share, `parallelize` it, then the engine wraps it."""
    init_file = agreement.from_main(lambda: ckpt.initial_weights_file(init_from, cfg.model)) if init_from else None
    gate = UpdateGate(cfg.train.spike_factor)
    if cfg.parallel.engine == "local":
        model = Llama(cfg.model)
        if init_file:
            ckpt.load_initial_weights(model, init_file)
        return LocalEngine(parallelize_local(model, cfg.train, cfg.parallel), cfg.train, gate)
    if pick_device(cfg.train.device).type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed picks its accelerator when first imported
    from bigtrain.engine.deepspeed.engine import DeepSpeedEngine  # imports DeepSpeed: slow
    from bigtrain.engine.deepspeed.grid import init_topology
    from bigtrain.engine.deepspeed.stages import build_layers, parallelize_stage

    topology = init_topology(cfg)
    timer = PhaseTimer(rank_device(cfg.train.device))  # sequence parallelism and the engine share it
    layers = build_layers(cfg.model, topology, init_file)  # this rank's share only, one layer at a time
    return DeepSpeedEngine(parallelize_stage(layers, cfg, topology, timer), cfg, topology, gate, timer)


def train(cfg: Config, console: bool = True, stop: StopRequest | None = None) -> TrainResult:
    """Train `cfg.model` on `cfg.data` with the configured engine, resuming if asked.

    The processes start first, then every rank waits for rank 0 to hold the run directory's lock
    (`run.lock`, `run.wait_lock`) before anything in it is read. A signal before the loop starts
    ends the process at once; SIGUSR1/SIGTERM during training (caught by `stop`, or from this call
    on) make it save at the next logging step and return with `preempted` set."""
    check_layout(cfg, process_env().world_size)  # before touching data or starting processes
    resolve_precision(cfg.train.precision, pick_device(cfg.train.device), cfg.parallel.engine)  # and before any model
    check_remote_data(cfg.data)  # an unreadable bucket fails here, before processes or the model
    with (contextlib.nullcontext(stop) if stop else StopRequest()) as stop:
        try:
            if cfg.parallel.engine == "deepspeed":
                init_processes(cfg)
            with run_lock(cfg.run.path, cfg.run.wait_lock, enabled=cfg.run.lock):
                return Trainer(cfg, console, stop).run()
        except heartbeat.PeersLost:
            raise
        except BigtrainError as e:  # the other ranks name this rank and its line, not a broken collective
            heartbeat.report_error(str(e))
            raise
        except (RuntimeError, OSError) as e:  # a collective failed or timed out: was a rank lost?
            heartbeat.check_peers(e)
            raise


class Trainer:
    """One training run: its engine, data and sinks, and the loop over them. Each concern of a step
    (logging, validation, saving, stopping) is a method the loop calls when that concern is due."""

    def __init__(self, cfg: Config, console: bool, stop: StopRequest):
        self.started = time.perf_counter()
        self.cfg, self.stop = cfg, stop
        set_determinism(cfg.run.seed, cfg.train)
        if cfg.train.reuse_host_memory:
            reuse_freed_memory()
        self.mirror = CheckpointMirror(cfg.checkpoint) if cfg.checkpoint.remote else None
        resume_from = agreement.from_main(lambda: find_resume_checkpoint(cfg, self.mirror))  # one point for all
        from_remote = resume_from is None and cfg.run.resume == "auto" and self.mirror and self.mirror.reached
        self.engine = engine = build_engine(cfg, None if resume_from or from_remote else cfg.model.init_from)
        if from_remote:
            resume_from = self.mirror.fetch(ckpt.checkpoint_root(cfg.run.path), engine)
        elif self.mirror and cfg.run.resume == "auto" and resume_from and resume_from.name > (self.mirror.reached or ""):
            self.mirror.upload(resume_from, engine)  # the remote missed it (a job killed while uploading)
        self.loader = build_train_loader(cfg.data, cfg.data.micro_batch, cfg.train.grad_accum, dp_rank=engine.dp_rank,
                                         dp_size=engine.dp_size, seed=cfg.run.seed,
                                         model_vocab_size=cfg.model.vocab_size)
        if cfg.data.prefetch:
            self.loader = Prefetcher(self.loader, pin_memory=engine.device.type == "cuda")
        self.val = build_val_data(cfg.data, cfg.data.seq_len)
        self.tasks = None
        if cfg.eval.tasks:  # resolved and loaded now: a bad task name fails before the first step
            from bigtrain.eval.harness import TrainingTasks  # imports lm-eval: only when asked for

            self.tasks = TrainingTasks(cfg.eval, cfg.model.max_seq_len, engine, self.loader.tokenizer_path)
        self.step, self.tokens, self.bad = 0, 0, BadSteps(cfg.train)
        state = self._resume(resume_from) if resume_from is not None else {}
        self.run_dir = cfg.run.path
        if engine.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        self.sinks = build_sinks(cfg, self.run_dir, self.step, state, console) if engine.is_main else Sinks([])
        self.tokens_per_step = self.loader.global_batch * cfg.data.seq_len
        self.speed = SpeedMeter(self.tokens_per_step, flops_per_token(cfg.model, cfg.data.seq_len), engine.world_size,
                                peak_flops(engine.device, cfg.log.peak_tflops))
        self.losses: list[float] = []  # every step's loss, averaged over data-parallel ranks at logging time
        self.window_losses: list[torch.Tensor] = []  # this rank's, since the last log
        self.last_val: EvalResult | None = None
        self.last_saved: Path | None = None
        self.window_start, self.window_steps = time.perf_counter(), 0

    def _resume(self, checkpoint: Path) -> dict:
        ckpt.check_same_model(checkpoint, self.cfg.model)
        state = ckpt.load_checkpoint(checkpoint, self.engine, verify=self.cfg.checkpoint.verify)
        self.loader.load_state_dict(state["loader"])
        self.step, self.tokens = state["step"], state["tokens"]
        self.bad.load_state_dict(state.get("bad_steps", {}), self.engine.gate)
        return state

    def run(self) -> TrainResult:
        cfg = self.cfg
        self.stop.defer()  # from here on a signal means: checkpoint at the next logging step
        first_val = self.validate() if self.step == 0 else None
        if self.step == 0:
            self.evaluate_tasks()
        self.last_val, ending = first_val, None
        try:
            while self.step < cfg.train.steps and ending not in ("out_of_time", "preempted"):
                out = self.train_step()
                ending = self.ending()
                if self.step % cfg.log.every == 0 or ending:
                    self.log_step(out)
                paused = time.perf_counter()  # validation and saving do not count as step time
                if self.step % cfg.train.eval_every == 0 or ending in ("done", "out_of_time"):
                    self.last_val = self.validate()
                if self.step % cfg.eval.every == 0 or ending in ("done", "out_of_time"):
                    self.evaluate_tasks()
                if self.step % cfg.checkpoint.every == 0 or ending:
                    self.last_saved = self.save()
                self.window_start += time.perf_counter() - paused
            if self.mirror:
                self.log_upload(self.mirror.wait(self.engine))
                self.mirror.check_final()
        finally:
            self.sinks.close()
        if ending == "preempted":
            self.engine.barrier()  # leave together: torchrun stops the other workers when one exits
        return TrainResult(
            run_dir=self.run_dir, step=self.step, tokens=self.tokens, losses=self.losses,
            checkpoint=self.last_saved or ckpt.latest_checkpoint(self.run_dir), val=self.last_val,
            first_val=first_val, wall_s=time.perf_counter() - self.started, is_main=self.engine.is_main,
            preempted=ending == "preempted",
        )

    def train_step(self) -> StepOutput:
        with self.engine.timer.phase("data", host=True):
            batches = self.loader.next_step()
        out = self.engine.train_step(batches, lr_at(self.step, self.cfg.train))
        self.step, self.tokens, self.window_steps = self.step + 1, self.tokens + self.tokens_per_step, self.window_steps + 1
        self.window_losses.append(out.loss)
        self.bad.record(out.skipped)
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
        out_of_time = max_minutes is not None and self.engine.any_rank(
            time.perf_counter() - self.started > 60 * max_minutes)
        if self.engine.any_rank(self.stop.requested):
            return "preempted"
        return "out_of_time" if out_of_time else None

    def log_step(self, out: StepOutput) -> None:
        """One training record (the losses reach the host only here), then the bad-step check."""
        window_s = time.perf_counter() - self.window_start
        engine = self.engine
        self.losses += engine.mean_over_dp(torch.stack(self.window_losses)).tolist()
        self.window_losses = []
        self.sinks.log({
            "step": self.step, "loss": self.losses[-1], "lr": lr_at(self.step - 1, self.cfg.train),
            "grad_norm": float(out.grad_norm), "tokens": self.tokens,
            **self.speed.measure(self.window_steps, window_s, engine.step_times()),
            "peak_mem_gb": peak_memory_gb(engine.device), "skipped_steps": self.bad.total(),
            "fp16_overflow_steps": engine.overflow_steps, "loss_scale": engine.loss_scale,
        })
        self.bad.check(self.step, self.run_dir)
        if self.mirror:
            self.log_upload(self.mirror.poll(engine))
        self.window_start, self.window_steps = time.perf_counter(), 0

    def validate(self) -> EvalResult | None:
        if self.val is None:
            return None
        engine, cfg = self.engine, self.cfg
        result = evaluate(engine.eval_loss, self.val, cfg.data.micro_batch,
                          cfg.train.eval_batches * self.loader.global_batch, engine.dp_rank, engine.dp_size,
                          engine.sum_across_dp)
        self.sinks.log({"step": self.step, "tokens": self.tokens, "val_loss": result.loss,
                        "val_perplexity": result.perplexity})
        return result

    def evaluate_tasks(self) -> None:
        """lm-eval tasks (`eval.tasks`) on the current weights; rank 0 logs `eval/<task>/<metric>`."""
        metrics = self.tasks.run() if self.tasks else None
        if metrics is not None:
            self.sinks.log({"step": self.step, "tokens": self.tokens, **metrics})

    def save(self) -> Path:
        self.bad.check(self.step, self.run_dir)  # never save past the allowed run of bad steps
        if self.mirror:  # one upload at a time; local pruning never removes files in flight
            self.log_upload(self.mirror.wait(self.engine))
        saving = time.perf_counter()
        state = {"tokens": self.tokens, "loader": self.loader.state_dict(),
                 "bad_steps": self.bad.state_dict(self.engine.gate), **self.sinks.state()}
        path = ckpt.save_checkpoint(self.run_dir, self.step, self.engine, state, self.cfg, self.loader.tokenizer_path,
                                    self.cfg.checkpoint.keep_last)
        if self.engine.is_main:
            self.sinks.log({"step": self.step, "checkpoint": path.name,
                            "checkpoint_save_s": time.perf_counter() - saving,
                            "checkpoint_gb": directory_size(path) / 2**30})
        if self.mirror:
            self.mirror.upload(path, self.engine)
        return path

    def log_upload(self, record: dict | None) -> None:
        """Log a checkpoint's arrival in `checkpoint.remote` (`checkpoint_upload_s`: rank 0's upload time)."""
        if record is not None:
            self.sinks.log({"step": self.step, **record})
