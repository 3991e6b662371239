"""The training loop: data → engine step → metrics, periodic validation and checkpoints, resume."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bigtrain.config import Config, save_config
from bigtrain.data.build import build_train_loader, build_val_data
from bigtrain.data.prefetch import Prefetcher
from bigtrain.distributed.local import LocalEngine
from bigtrain.distributed.topology import check_layout, init_topology, process_env
from bigtrain.errors import BigtrainError
from bigtrain.eval.perplexity import EvalResult, evaluate
from bigtrain.model import Llama, flops_per_token
from bigtrain.train import checkpoint as ckpt
from bigtrain.train.bad_steps import BadSteps
from bigtrain.train.host_memory import reuse_freed_memory
from bigtrain.train.metrics import SpeedMeter, directory_size, peak_flops, peak_memory_gb
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


def set_determinism(seed: int, deterministic: bool) -> None:
    """Seed torch; `deterministic` picks deterministic kernels. torch's debugging aid that fills
    every new uninitialized tensor with NaN stays off: no kernel here reads memory it has not
    written, and the fill cost DeepSpeed ZeRO-1 a third of its CPU step (it allocates fresh flat
    buffers every step)."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False


def find_resume_checkpoint(cfg: Config) -> Path | None:
    """The checkpoint to start from; refuse to start over a run that already has checkpoints."""
    run_dir, resume = cfg.run.path, cfg.run.resume
    if resume == "auto":
        return ckpt.latest_checkpoint(run_dir)
    if resume:
        return ckpt.resolve_checkpoint(resume)
    if ckpt.latest_checkpoint(run_dir) is not None:
        raise BigtrainError(
            f"{run_dir} already has checkpoints; pass run.resume=auto to continue it or choose another run.name"
        )
    return None


def build_engine(cfg: Config, init_from: str | None = None):
    """The local engine for one process, else DeepSpeed over the launched processes; the model
    starts from the weights of checkpoint `init_from` when given."""
    if cfg.parallel.engine == "local":
        model = Llama(cfg.model)
        if init_from:
            ckpt.load_initial_weights(model, init_from)
        return LocalEngine(model, cfg.train)
    from bigtrain.distributed.deepspeed_engine import DeepSpeedEngine  # imports DeepSpeed: slow
    from bigtrain.distributed.stage_build import build_stage

    init_file = ckpt.initial_weights_file(init_from, cfg.model) if init_from else None
    topology = init_topology(cfg)
    return DeepSpeedEngine(build_stage(cfg.model, topology, init_file), cfg, topology)  # this rank's share only


def train(cfg: Config, console: bool = True, stop: StopRequest | None = None) -> TrainResult:
    """Train `cfg.model` on `cfg.data` with the configured engine, resuming if asked.

    SIGUSR1/SIGTERM (caught by `stop`, or from this call on) make it save after the current step
    and return with `preempted` set."""
    if stop is not None:
        return _train(cfg, console, stop)
    with StopRequest() as stop:
        return _train(cfg, console, stop)


def _train(cfg: Config, console: bool, stop: StopRequest) -> TrainResult:
    started = time.perf_counter()
    check_layout(cfg, process_env().world_size)  # before touching data or starting processes
    set_determinism(cfg.run.seed, cfg.train.deterministic)
    if cfg.train.reuse_host_memory:
        reuse_freed_memory()
    resume_from = find_resume_checkpoint(cfg)
    engine = build_engine(cfg, None if resume_from else cfg.model.init_from)
    loader = build_train_loader(cfg.data, cfg.data.micro_batch, cfg.train.grad_accum, dp_rank=engine.dp_rank,
                                dp_size=engine.dp_size, seed=cfg.run.seed, model_vocab_size=cfg.model.vocab_size)
    if cfg.data.prefetch:
        loader = Prefetcher(loader, pin_memory=engine.device.type == "cuda")
    val = build_val_data(cfg.data, cfg.data.seq_len)
    step, tokens, state, bad = 0, 0, {}, BadSteps(cfg.train)
    if resume_from is not None:
        ckpt.check_same_model(resume_from, cfg.model)
        state = ckpt.load_checkpoint(resume_from, engine)
        loader.load_state_dict(state["loader"])
        step, tokens = state["step"], state["tokens"]
        bad.load_state_dict(state.get("bad_steps", {}), engine.gate)

    run_dir, main = cfg.run.path, engine.is_main
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    sinks = build_sinks(cfg, run_dir, step, state, console) if main else Sinks([])
    log = sinks.log
    tokens_per_step = loader.global_batch * cfg.data.seq_len
    speed = SpeedMeter(tokens_per_step, flops_per_token(cfg.model, cfg.data.seq_len), engine.world_size,
                       peak_flops(engine.device, cfg.log.peak_tflops))

    def validate() -> EvalResult | None:
        if val is None:
            return None
        result = evaluate(engine.eval_loss, val, cfg.data.micro_batch, cfg.train.eval_batches * loader.global_batch,
                          engine.dp_rank, engine.dp_size, engine.sum_across_dp)
        log({"step": step, "tokens": tokens, "val_loss": result.loss, "val_perplexity": result.perplexity})
        return result

    def save() -> Path:
        bad.check(step, run_dir)  # never save past the allowed run of bad steps
        saving = time.perf_counter()
        state = {"tokens": tokens, "loader": loader.state_dict(), "bad_steps": bad.state_dict(engine.gate), **sinks.state()}
        path = ckpt.save_checkpoint(run_dir, step, engine, state, cfg, loader.tokenizer_path, cfg.checkpoint.keep_last)
        if main:
            log({"step": step, "checkpoint": path.name, "checkpoint_save_s": time.perf_counter() - saving,
                 "checkpoint_gb": directory_size(path) / 2**30})
        return path

    first_val = validate() if step == 0 else None
    last_val, last_saved, losses, preempted = first_val, None, [], False
    window_start, window_steps = time.perf_counter(), 0
    try:
        while step < cfg.train.steps:
            with engine.timer.phase("data", host=True):
                batches = loader.next_step()
            out = engine.train_step(batches, lr_at(step, cfg.train))
            step, tokens, window_steps = step + 1, tokens + tokens_per_step, window_steps + 1
            losses.append(out.loss)
            bad.record(out.skipped)
            out_of_time = cfg.train.max_minutes is not None and engine.any_rank(
                time.perf_counter() - started > 60 * cfg.train.max_minutes
            )
            preempted = step < cfg.train.steps and engine.any_rank(stop.requested)
            last = step == cfg.train.steps or out_of_time
            if step % cfg.log.every == 0 or last or preempted:
                loss = out.loss.item()  # the loss reaches the host only at logging time
                log({
                    "step": step, "loss": loss, "lr": lr_at(step - 1, cfg.train), "grad_norm": float(out.grad_norm),
                    "tokens": tokens, **speed.measure(window_steps, time.perf_counter() - window_start, engine.step_times()),
                    "peak_mem_gb": peak_memory_gb(engine.device), "skipped_steps": bad.total(),
                    "fp16_overflow_steps": engine.overflow_steps, "loss_scale": engine.loss_scale,
                })
                bad.check(step, run_dir)
                window_start, window_steps = time.perf_counter(), 0
            paused = time.perf_counter()  # validation and saving do not count as step time
            if step % cfg.train.eval_every == 0 or last:
                last_val = validate()
            if step % cfg.checkpoint.every == 0 or last or preempted:
                last_saved = save()
            window_start += time.perf_counter() - paused
            if out_of_time or preempted:
                break
    finally:
        sinks.close()
    if preempted:
        engine.barrier()  # leave together: torchrun stops the other workers when one exits
    return TrainResult(
        run_dir=run_dir, step=step, tokens=tokens, losses=[float(x) for x in losses],
        checkpoint=last_saved or ckpt.latest_checkpoint(run_dir), val=last_val, first_val=first_val,
        wall_s=time.perf_counter() - started, is_main=main, preempted=preempted,
    )
