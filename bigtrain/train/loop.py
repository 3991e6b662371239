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
from bigtrain.train.metrics import MetricsLogger, peak_flops, peak_memory_gb
from bigtrain.train.schedule import lr_at


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


def set_determinism(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


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


def build_engine(cfg: Config):
    """The local engine for one process, else DeepSpeed over the launched processes."""
    if cfg.parallel.engine == "local":
        return LocalEngine(Llama(cfg.model), cfg.train)
    from bigtrain.distributed.deepspeed_engine import DeepSpeedEngine  # imports DeepSpeed: slow

    topology = init_topology(cfg)
    return DeepSpeedEngine(Llama(cfg.model), cfg, topology)


def train(cfg: Config, console: bool = True) -> TrainResult:
    """Train `cfg.model` on `cfg.data` with the configured engine, resuming if asked."""
    started = time.perf_counter()
    check_layout(cfg, process_env().world_size)  # before touching data or starting processes
    set_determinism(cfg.run.seed, cfg.train.deterministic)
    resume_from = find_resume_checkpoint(cfg)
    engine = build_engine(cfg)
    loader = build_train_loader(cfg.data, cfg.data.micro_batch, cfg.train.grad_accum, dp_rank=engine.dp_rank,
                                dp_size=engine.dp_size, seed=cfg.run.seed, model_vocab_size=cfg.model.vocab_size)
    if cfg.data.prefetch:
        loader = Prefetcher(loader, pin_memory=engine.device.type == "cuda")
    val = build_val_data(cfg.data, cfg.data.seq_len)
    step, tokens = 0, 0
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, engine)
        loader.load_state_dict(state["loader"])
        step, tokens = state["step"], state["tokens"]

    run_dir, main = cfg.run.path, engine.is_main
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    logger = MetricsLogger(run_dir, cfg.train.steps, step, console=console) if main else None
    tokens_per_step = loader.global_batch * cfg.data.seq_len
    flops_per_step = flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_step
    peak = peak_flops(engine.device, cfg.log.peak_tflops)
    peak = peak * engine.world_size if peak else None

    def log(record: dict) -> None:
        if logger:
            logger.log(record)

    def validate() -> EvalResult | None:
        if val is None:
            return None
        result = evaluate(engine.eval_loss, val, cfg.data.micro_batch, cfg.train.eval_batches * loader.global_batch,
                          engine.dp_rank, engine.dp_size, engine.sum_across_dp)
        log({"step": step, "tokens": tokens, "val_loss": result.loss, "val_perplexity": result.perplexity})
        return result

    def save() -> Path:
        state = {"tokens": tokens, "loader": loader.state_dict()}
        return ckpt.save_checkpoint(run_dir, step, engine, state, cfg, loader.tokenizer_path, cfg.checkpoint.keep_last)

    first_val = validate() if step == 0 else None
    last_val, last_saved, losses = first_val, None, []
    window_start, window_steps = time.perf_counter(), 0
    try:
        while step < cfg.train.steps:
            batches = loader.next_step()
            out = engine.train_step(batches, lr_at(step, cfg.train))
            step, tokens, window_steps = step + 1, tokens + tokens_per_step, window_steps + 1
            losses.append(out.loss)
            out_of_time = cfg.train.max_minutes is not None and engine.any_rank(
                time.perf_counter() - started > 60 * cfg.train.max_minutes
            )
            last = step == cfg.train.steps or out_of_time
            if step % cfg.log.every == 0 or last:
                loss = out.loss.item()  # the only host sync: at logging time
                if loss != loss or loss in (float("inf"), float("-inf")):
                    raise BigtrainError(f"loss is {loss} at step {step}; lower train.lr or check the data")
                step_time = (time.perf_counter() - window_start) / window_steps
                log({
                    "step": step, "loss": loss, "lr": lr_at(step - 1, cfg.train), "grad_norm": float(out.grad_norm),
                    "tokens": tokens, "tokens_per_s": tokens_per_step / step_time,
                    "mfu": flops_per_step / step_time / peak if peak else None,
                    "step_time_s": step_time, "peak_mem_gb": peak_memory_gb(engine.device),
                })
                window_start, window_steps = time.perf_counter(), 0
            paused = time.perf_counter()  # validation and saving do not count as step time
            if step % cfg.train.eval_every == 0 or last:
                last_val = validate()
            if step % cfg.checkpoint.every == 0 or last:
                last_saved = save()
            window_start += time.perf_counter() - paused
            if out_of_time:
                break
    finally:
        if logger:
            logger.close()
    return TrainResult(
        run_dir=run_dir, step=step, tokens=tokens, losses=[float(x) for x in losses],
        checkpoint=last_saved or ckpt.latest_checkpoint(run_dir), val=last_val, first_val=first_val,
        wall_s=time.perf_counter() - started, is_main=main,
    )
