"""The local engine: one process, one device (CPU or a CUDA GPU), no launcher, no DeepSpeed.

This is the debug mode and the reference every parallel layout is compared against.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from bigtrain.checkpoint import format as fmt
from bigtrain.checkpoint.writes import Direct
from bigtrain.config import Config, ParallelConfig, TrainConfig
from bigtrain.distributed.communicator import LoneProcess
from bigtrain.distributed.timing import PhaseTimer
from bigtrain.engine.contract import StepOutput
from bigtrain.engine.device import autocast_for, compile_enabled, pick_device, resolve_precision
from bigtrain.engine.master_weights import MasterWeights
from bigtrain.engine.materialize import Materializer
from bigtrain.engine.memory import MemoryPeak
from bigtrain.engine.optimizer import build_optimizer, scheduled_lr
from bigtrain.engine.update_gate import UpdateGate
from bigtrain.errors import BigtrainError
from bigtrain.model import Llama
from bigtrain.model.llama import DocumentMasking, set_z_loss
from bigtrain.model.loss import ZLoss
from bigtrain.model.moe import set_auxiliary_scale, take_router_stats
from bigtrain.parallel.parallelize import parallelize


def local_engine(model: Llama, train: TrainConfig, parallel: ParallelConfig | None = None,
                 gate: UpdateGate | None = None, materialize: Materializer | None = None) -> LocalEngine:
    """`parallelize` a whole model (tp = sp = 1: float8 linears when `train.precision` resolves to
    fp8 on this device, activation checkpointing, compile), then wrap it; `gate` defaults to one
    of `train.spike_*`. A model on the meta device gets its values from `materialize`."""
    device = pick_device(train.device)
    cfg = Config(model=model.cfg, train=train, parallel=parallel or ParallelConfig())
    fp8 = resolve_precision(train.precision, device, "local") == "fp8"
    with MemoryPeak(device) as construction:
        layers = parallelize(model.layers, cfg, fp8=fp8, compile=compile_enabled(train.compile, device),
                             materialize=materialize)
    engine = LocalEngine(Llama(model.cfg, layers), train, gate or UpdateGate.from_config(train))
    engine.construct_peak_gb = construction.gb
    return engine


class LocalEngine:
    """Runs forward, backward and the optimizer (AdamW or Muon) for one optimiser step over a list of micro-batches."""

    comm = LoneProcess()
    loss_is_global = True  # one process holds every loss
    construct_peak_gb = 0.0  # set by `local_engine`
    documents: DocumentMasking | None = None  # document masking: set by whoever knows the data

    def __init__(self, model: nn.Module, cfg: TrainConfig, gate: UpdateGate):
        """`model` is whole and already parallelized (`parallelize`: fp8, checkpointing, compile);
        `gate` decides which updates to skip. A model built elsewhere is moved to the device (a
        built one is there already)."""
        self.device = pick_device(cfg.device)
        self.timer = PhaseTimer(self.device)
        self.model = model.to(self.device)
        precision = resolve_precision(cfg.precision, self.device, "local")
        self.autocast = lambda: autocast_for(self.device, precision)
        self.grad_clip = cfg.grad_clip
        self.masters = None  # train.master_weights: the optimizer updates fp32 masters of bf16 parameters
        if cfg.master_weights:
            if precision != "bf16":
                raise BigtrainError(f"train.master_weights needs bf16 (train.precision=bf16, or auto on a CUDA "
                                    f"device); this run trains in {precision}")
            self.masters = MasterWeights(self.model)
        self.optimizer = build_optimizer(self.model, cfg, *(
            (self.masters.regroup, self.masters.names(self.model)) if self.masters else ()))
        self.trained = self.masters.masters if self.masters else list(self.model.parameters())
        # fused AdamW (and Muon) divide the gradients by `grad_scale` as they read them: clipping costs no pass
        # of its own. On CUDA only: on the CPU the in-place multiply keeps fp32 runs bit for bit
        # (x / (1 / c) and x · c differ in the last bit), and the pass costs little there.
        self.fold_clip = bool(self.optimizer.defaults["fused"]) and self.device.type == "cuda"
        self.gate = gate
        self.z_loss = ZLoss(cfg.z_loss) if cfg.z_loss else None
        set_z_loss(self.model, self.z_loss)

    def train_step(self, micro_batches: list[torch.Tensor], lr: float) -> StepOutput:
        """Accumulate gradients over `micro_batches` ([b, seq+1] tokens each), then update once."""
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = scheduled_lr(group, lr)
        total = torch.zeros((), device=self.device)
        set_auxiliary_scale(self.model, 1 / len(micro_batches))
        with self.autocast():  # once per step: its cache of low-precision weight copies serves every micro-batch
            for batch in micro_batches:
                with self.timer.phase("forward"):
                    tokens = batch.to(self.device, non_blocking=True)
                    loss = self._loss(tokens) / len(micro_batches)
                with self.timer.phase("backward"), torch.autocast(self.device.type, enabled=False):
                    loss.backward()
                total += loss.detach()
        with self.timer.phase("optimizer"):
            grad_norm = self._clip_gradients()
            skip = self.gate.skip(total, grad_norm)
            if self.optimizer.defaults["fused"]:
                self.optimizer.found_inf = skip.float()  # fused AdamW (and Muon) skip on the device: no host sync
                self.optimizer.step()
            elif not skip:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.masters:
                self.masters.copy_to_model()
        return StepOutput(loss=total, grad_norm=grad_norm, skipped=skip)

    def _clip_gradients(self) -> torch.Tensor:
        """The gradients' total norm, with the gradients scaled to at most `train.grad_clip`: in
        place (torch's `clip_grad_norm_`), or with `fold_clip` by fused AdamW (its `grad_scale`,
        the inverse of the clip coefficient), as the update reads them."""
        max_norm = self.grad_clip if self.grad_clip else float("inf")
        if not self.fold_clip:
            return torch.nn.utils.clip_grad_norm_(self.trained, max_norm)
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.trained if p.grad is not None])
        # clip_grad_norm_'s coefficient min(1, max_norm / (norm + 1e-6)), inverted
        self.optimizer.grad_scale = ((grad_norm + 1e-6) / max_norm).clamp(min=1.0) if self.grad_clip else None
        return grad_norm

    def step_times(self) -> dict[str, float]:
        """Seconds per phase since the last call (call at logging time: it waits for the device)."""
        return self.timer.read()

    def router_stats(self) -> torch.Tensor | None:
        """Each MoE block's routing since the last call (`take_router_stats`); None for a dense model."""
        cfg = self.model.cfg
        return take_router_stats(self.model, cfg) if cfg.moe.experts else None

    def take_z_loss(self) -> float | None:
        """The mean z-loss of the training passes since the last call (None: `train.z_loss` is 0)."""
        sums = self.z_loss.take() if self.z_loss is not None else None
        return None if sums is None else float(sums[1] / sums[0])

    @torch.no_grad()
    def eval_loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss of one batch, in eval mode."""
        self.model.eval()
        tokens = tokens.to(self.device)
        with self.autocast():
            loss = self._loss(tokens)
        self.model.train()
        return loss

    def _loss(self, tokens: torch.Tensor) -> torch.Tensor:
        inputs = tokens[:, :-1]
        return self.model(inputs, tokens[:, 1:], *(self.documents(inputs) if self.documents else ()))

    def save(self, directory: Path, writes: Direct) -> None:
        """Write (or stage) the weights (the fp32 masters with `train.master_weights`) and the
        optimizer state into a checkpoint directory."""
        with self.masters.exposed() if self.masters else contextlib.nullcontext():
            fmt.save_weights(self.model, directory, writes)
        fmt.save_optimizer(self.optimizer, directory, writes)

    def load(self, directory: Path) -> None:
        with self.masters.exposed() if self.masters else contextlib.nullcontext():
            fmt.load_weights(self.model, directory)
        self.optimizer.load_state_dict(fmt.load_optimizer(directory, map_location=self.device))
