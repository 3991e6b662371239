"""The DeepSpeed engine: ZeRO 0-3 over the data-parallel group and DeepSpeed's pipeline engine
(1F1B) when `parallel.pp > 1`, around the stage `parallelize` made ready (tensor and Ulysses
sequence parallelism included); its changes to DeepSpeed are `patches.py`'s."""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.utils import clip_grad_norm_
from torch import nn

from bigtrain import compat
from bigtrain.checkpoint import format as fmt
from bigtrain.checkpoint import safe_load
from bigtrain.checkpoint.writes import Direct
from bigtrain.config import Config
from bigtrain.distributed.communicator import ProcessGroups
from bigtrain.distributed.timing import PhaseTimer
from bigtrain.engine.contract import StepOutput
from bigtrain.engine.deepspeed.config import deepspeed_config
from bigtrain.engine.deepspeed.experts import (
    clip_with_experts,
    declare_experts,
    expert_param_groups,
    save_full_state,
)
from bigtrain.engine.deepspeed.full_state import load_full_state
from bigtrain.engine.deepspeed.grid import Grid, Topology
from bigtrain.engine.deepspeed.muon import hand_partitions, muon_problem
from bigtrain.engine.deepspeed.patches import (
    gate_optimizer_step,
    mark_for_grad_norm,
    pipeline_module,
    record_grad_norm,
    send_whole_activations,
    time_pipeline_instructions,
)
from bigtrain.engine.deepspeed.stages import Stage, parallelize_stage, stage_layers
from bigtrain.engine.device import rank_device
from bigtrain.engine.materialize import Materializer
from bigtrain.engine.memory import MemoryPeak
from bigtrain.engine.optimizer import build_optimizer, scheduled_lr
from bigtrain.engine.update_gate import UpdateGate
from bigtrain.errors import BigtrainError
from bigtrain.model import Llama, lm_loss
from bigtrain.model.llama import DocumentMasking, set_z_loss
from bigtrain.model.loss import ZLoss
from bigtrain.model.moe import set_auxiliary_scale, take_router_stats
from bigtrain.parallel.deepspeed_ulysses import sequence_mean, sequence_slice
from bigtrain.parallel.vocab_parallel_loss import vocab_parallel_cross_entropy

TAG = fmt.DEEPSPEED  # DeepSpeed's sub-directory inside a bigtrain checkpoint, and its tag


def build_deepspeed_engine(cfg: Config, topology: Topology, gate: UpdateGate,
                           init_file: Path | None = None) -> DeepSpeedEngine:
    """This rank's share of the model, built from the meta device (seeded by `run.seed`, or read
    from `init_file`), parallelized and wrapped: what `train` runs and `info --simulate` measures."""
    materialize = Materializer(cfg.model, rank_device(cfg.train.device), cfg.run.seed, init_file,
                               topology.tp_group if topology.tp > 1 else None, topology.ep_group)
    return deepspeed_engine(stage_layers(cfg.model, topology), cfg, topology, gate, materialize)


def deepspeed_engine(layers: Iterable[nn.Module], cfg: Config, topology: Topology, gate: UpdateGate,
                     materialize: Materializer | None = None) -> DeepSpeedEngine:
    """`parallelize` this rank's layers, each as it arrives (from the meta device: `materialize`
    gives them values; under ZeRO-3 each is partitioned at once), then wrap them."""
    device = rank_device(cfg.train.device)
    timer = PhaseTimer(device)  # sequence parallelism and the engine share it
    ds_config = deepspeed_config(cfg, topology.dp * topology.sp)
    finish = partial(partition_now, ds_config=ds_config, grid=topology.grid) if cfg.parallel.zero_stage == 3 else None
    with MemoryPeak(device) as construction:
        stage = parallelize_stage(layers, cfg, topology, timer, materialize, finish)
    engine = DeepSpeedEngine(stage, cfg, topology, gate, timer, ds_config)
    engine.construct_peak_gb = construction.gb
    return engine


def partition_now(layer: nn.Module, ds_config: dict, grid: Grid) -> None:
    """ZeRO-3 from construction on: keep only this rank's 1/(dp·sp) of the layer's parameters,
    in the dtype the engine trains in (buffers stay as they are), as `deepspeed.initialize` would
    have partitioned them."""
    dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.half if ds_config["fp16"]["enabled"] else None
    for p in layer.parameters():
        if dtype is not None and p.dtype != dtype:
            p.data = p.data.to(dtype)
    deepspeed.zero.Init(module=layer, data_parallel_group=grid.get_data_parallel_group(),
                        config_dict_or_path=ds_config, mpu=grid, dtype=dtype)


class DeepSpeedEngine:
    """Wraps `deepspeed.initialize` behind the same `train_step` / `save` / `load` as the local engine."""

    construct_peak_gb = 0.0  # set by `deepspeed_engine`
    documents: DocumentMasking | None = None  # document masking: set by whoever knows the data

    def __init__(self, stage: Stage, cfg: Config, topology: Topology, gate: UpdateGate, timer: PhaseTimer,
                 ds_config: dict):
        """`stage` is this rank's share, already parallelized (`parallelize`, with `timer` for
        sequence parallelism) and on its device; `gate` decides which updates to skip;
        `ds_config` is `deepspeed_config`'s for this layout."""
        self.topology, self.timer, self.gate = topology, timer, gate
        self.device = rank_device(cfg.train.device)
        self.z_loss = ZLoss(cfg.train.z_loss) if cfg.train.z_loss else None
        # the pipeline engine's loss (its last stage gets logits); otherwise the head computes the
        # loss chunk by chunk, vocab-parallel under tp > 1 (with the z-loss: `set_z_loss` below)
        self.loss_fn = partial(lm_loss, z_loss=self.z_loss)
        if topology.tp > 1:
            self.loss_fn = partial(vocab_parallel_cross_entropy, group=topology.tp_group, z_loss=self.z_loss)
        self.cfg, self.param_names = cfg, stage.param_names()
        self.pipelined = topology.pp > 1
        self.aux_weight = 1.0  # the MoE auxiliary losses' gradient per micro-batch, × 1 / micro-batches
        if topology.sp > 1:
            grads_summed = not (self.pipelined and cfg.parallel.zero_stage == 0)
            self.aux_weight = 1.0 if grads_summed else float(topology.sp)  # each rank's part counts whole
            self.sequence_mean = partial(sequence_mean, group=topology.sp_group, grads_summed=grads_summed)
            token_loss = self.loss_fn
            self.loss_fn = lambda logits, targets: self.sequence_mean(token_loss(logits, targets))
        if self.pipelined:
            module = pipeline_module(stage.layers, self.loss_fn, topology.process_topology, topology.grid,
                                     (stage.start, stage.stop))
        else:
            module = Llama(cfg.model, stage.layers)
            set_z_loss(module, self.z_loss)
        if topology.ep > 1:
            declare_experts(module, topology)
        muon = cfg.train.optimizer == "muon"
        if muon and muon_problem(cfg, ds_config):
            raise BigtrainError(muon_problem(cfg, ds_config))
        optimizer = build_optimizer(module, cfg.train, expert_param_groups if topology.ep > 1 else None,
                                    self.param_names, topology.tp_group if topology.tp > 1 else None, cfg.model)
        if self.pipelined and topology.tp_sequence_parallel:
            ds_config = send_whole_activations(ds_config)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=ds_config,
            mpu=None if self.pipelined else topology.grid,
        )
        self.model = self.engine.module
        if muon:
            hand_partitions(self.engine.optimizer, optimizer)
        if self.pipelined:
            mark_for_grad_norm(self.model, topology.grid.get_slice_parallel_rank())
            time_pipeline_instructions(self.engine, self.timer)
        self._grad_norm: torch.Tensor | None = None
        self._pipeline_windows: torch.Size | None = None  # the shape the pipeline engine's buffers hold
        if topology.ep > 1:
            clip_with_experts(self.engine, topology, self._record_grad_norm)
        else:
            record_grad_norm(self.engine, self._record_grad_norm)
        # the step's loss is averaged over the data-parallel group at once only where something needs
        # it before the update (the spike gate); otherwise the loop does it at logging time
        self.loss_is_global = self.pipelined or gate.watches_loss
        self._step_loss, self._skip = None, None
        self._client_optimizer = optimizer
        gate_optimizer_step(optimizer, self._skip_update)
        self.comm = ProcessGroups(topology.dp_group, topology.dp_rank, topology.dp, self.device)

    def _record_grad_norm(self, norm: torch.Tensor) -> None:
        self._grad_norm = norm

    def _skip_update(self) -> torch.Tensor:
        """The gate's decision for this step, made once (ZeRO-3 steps once per sub-group)."""
        if self._skip is None:
            self._skip = self.gate.skip(self._step_loss, self._norm_before_update()).to(self.device)
        return self._skip

    def train_step(self, micro_batches: list[torch.Tensor], lr: float) -> StepOutput:
        """One optimiser step; the returned loss is this rank's unless `loss_is_global`. No collective of bigtrain's own runs here without the spike gate."""
        for group in self.optimizer.param_groups:
            group["lr"] = scheduled_lr(group, lr)
        self._grad_norm, self._step_loss, self._skip = None, None, None
        set_auxiliary_scale(self.model, self.aux_weight / len(micro_batches))
        documents = [self._documents(b) for b in micro_batches]  # of the whole windows
        micro_batches = [self._my_tokens(b) for b in micro_batches]
        if self.pipelined:
            self._pipeline_shape(micro_batches[0].shape)
            pairs = iter([self._pipeline_pair(b, d) for b, d in zip(micro_batches, documents, strict=True)])
            loss = self.engine.train_batch(data_iter=pairs)
        else:
            loss = torch.zeros((), device=self.device)
            for i, batch in enumerate(micro_batches):
                with self.timer.phase("forward"):
                    tokens = batch.to(self.device, non_blocking=True)
                    micro_loss = self._loss(tokens, documents[i])
                with self.timer.phase("backward"):
                    self.engine.backward(micro_loss)
                loss += micro_loss.detach().float() / len(micro_batches)
                if i == len(micro_batches) - 1 and self.loss_is_global:  # the gate sees the step's loss
                    self._step_loss = self.comm.mean_over_dp(loss)  # before the update
                    loss = self._step_loss
                with self.timer.phase("optimizer"):  # every micro-batch; DeepSpeed reduces and updates at the last
                    self.engine.step()
        norm = torch.as_tensor(self._norm_after_update(), dtype=torch.float32)
        if self._skip is not None:
            skipped = self._skip
        else:  # DeepSpeed skipped it: ZeRO on a non-finite norm (a bad step), fp16 on overflow (its
            # loss scaler's business, counted in `fp16_overflow_steps`)
            skipped = ~torch.isfinite(norm) & (not self.engine.fp16_enabled())
        return StepOutput(loss=loss, grad_norm=norm, skipped=skipped, overflow_steps=self.engine.skipped_steps,
                          loss_scale=self._loss_scale())

    def _my_tokens(self, windows: torch.Tensor) -> torch.Tensor:
        """This rank's share of the windows' tokens (all of them without sequence parallelism)."""
        sp = self.topology.sp
        return windows if sp == 1 else sequence_slice(windows, self.topology.sp_rank, sp)

    def _pipeline_shape(self, shape: torch.Size) -> None:
        """The pipeline engine keeps the activation and gradient buffers of the first batch it saw:
        reset them whenever the windows' shape changes (sequence-length warmup, validation batches
        of another shape). Every stage sees the same shapes, so all reset together."""
        if shape != self._pipeline_windows:
            if self._pipeline_windows is not None:
                self.engine.reset_activation_shape()
            self._pipeline_windows = shape

    def _pipeline_pair(self, tokens: torch.Tensor, documents: tuple) -> tuple:
        """(inputs, targets) for the pipeline engine; the inputs carry the documents along the stages."""
        inputs, targets = tokens[:, :-1].to(self.device), tokens[:, 1:].to(self.device)
        return ((inputs, *[d for d in documents if d is not None]) if documents else inputs), targets

    def _documents(self, windows: torch.Tensor) -> tuple:
        """The extra arguments of the model's forward for `windows` under document masking (else none)."""
        return self.documents(windows[:, :-1].to(self.device)) if self.documents else ()

    def _loss(self, tokens: torch.Tensor, documents: tuple = ()) -> torch.Tensor:
        loss = self.engine(tokens[:, :-1], tokens[:, 1:], *documents)
        return loss if self.topology.sp == 1 else self.sequence_mean(loss)

    def _norm_before_update(self) -> torch.Tensor | float:
        wrapper = self.engine.optimizer  # ZeRO and the bf16/fp16 optimizers measure it before stepping
        if wrapper is not self._client_optimizer and compat.optimizer_grad_norm(wrapper) is not None:
            return compat.optimizer_grad_norm(wrapper)
        if self._grad_norm is None:  # no clipping configured: measure without clipping
            self._grad_norm = clip_grad_norm_(self.model.parameters(), float("inf"), mpu=self.engine.mpu)
        return self._grad_norm

    def _norm_after_update(self) -> torch.Tensor | float:
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            norm = self._grad_norm if self._grad_norm is not None else float("nan")
        return norm

    def _loss_scale(self) -> float | None:
        """The current dynamic fp16 loss scale (None without fp16)."""
        if not self.engine.fp16_enabled():
            return None
        return compat.fp16_loss_scale(self.engine.optimizer)

    def step_times(self) -> dict[str, float]:
        """Seconds per phase since the last call; with pipeline stages, also `stage{k}_{phase}`
        of every stage (a collective: every rank calls it, at logging time)."""
        times = self.timer.read()
        if not self.pipelined:
            return times
        gathered: list = [None] * self.comm.world_size
        dist.all_gather_object(gathered, (self.engine.stage_id, times))
        for stage, stage_times in dict(reversed(gathered)).items():  # the first rank of each stage
            times.update({f"stage{stage}_{phase}": t for phase, t in stage_times.items() if phase != "data"})
        return times

    def router_stats(self) -> torch.Tensor | None:
        """Each MoE block's routing since the last call, summed over every rank that runs it (a
        collective at logging time); None for a dense model."""
        if not self.cfg.model.moe.experts:
            return None
        table = take_router_stats(self.model, self.cfg.model).to(self.device)
        dist.all_reduce(table)
        return table.cpu()

    def take_z_loss(self) -> float | None:
        """The mean z-loss of the training passes since the last call, over every rank that computed
        it (the loss's: the last stage's; tp ranks share it, sp ranks each have their tokens'): a
        collective at logging time. None when `train.z_loss` is 0."""
        if self.z_loss is None:
            return None
        sums = self.z_loss.take()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device) if sums is None else sums.to(self.device)
        dist.all_reduce(sums)
        return float(sums[1] / sums[0]) if sums[0] else None

    @torch.no_grad()
    def eval_loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss of one batch (every rank gets the same value)."""
        documents = self._documents(tokens)
        tokens = self._my_tokens(tokens).to(self.device)
        if self.pipelined:
            self._pipeline_shape(tokens.shape)
            return self.engine.eval_batch(iter([self._pipeline_pair(tokens, documents)]), num_micro_batches=1)
        self.engine.eval()
        loss = self._loss(tokens, documents).float()
        self.engine.train()
        return loss

    def save(self, directory: Path, writes: Direct) -> None:
        """DeepSpeed's own sharded format under `directory/deepspeed` (every rank writes its part),
        plus full fp32 weights in `model.safetensors` when there is no tensor or pipeline split.
        With expert parallelism: the single-process layout alone (`save_full_state`). Every file
        goes through `writes`."""
        if self.topology.ep > 1:
            save_full_state(self.model, self.engine.optimizer, self._client_optimizer, self.param_names, self.cfg,
                            self.topology, directory, writes)
            return
        with compat.checkpoint_files_through(self.engine, writes):
            self.engine.save_checkpoint(str(directory), tag=TAG, save_latest=False)
        if self.topology.tp == 1 and self.topology.pp == 1:
            params = list(self.model.parameters())
            with deepspeed.zero.GatheredParameters(params, enabled=self.engine.zero_optimization_stage() == 3):
                if self.comm.is_main:
                    writes.safetensors({name: p.detach().float() for name, p in self.model.named_parameters()},
                                       directory / fmt.WEIGHTS)

    def load(self, directory: Path) -> None:
        """DeepSpeed's own state of this layout, or the single-process layout (no `deepspeed/`:
        a local-engine checkpoint, or one `convert reshard` wrote) placed into this layout."""
        if not (directory / TAG).is_dir():
            load_full_state(self.engine, self._client_optimizer, self.param_names, self.cfg, self.topology, directory)
            return
        self._check_saved_layout(directory)
        allowed = safe_load.deepspeed_globals()
        safe_load.check_files(directory / TAG, allowed)  # every rank refuses together, before any collective
        with safe_load.weights_only_loads(allowed):
            path, _ = self.engine.load_checkpoint(str(directory), tag=TAG, load_lr_scheduler_states=False)
        if path is None:
            raise OSError(f"no DeepSpeed state under {directory / TAG}")

    def _check_saved_layout(self, directory: Path) -> None:
        """Refuse DeepSpeed state of another ZeRO stage, tp, pp, sp or number of ZeRO partitions
        (dp × sp) in one line."""
        saved = fmt.read_config(directory).parallel
        saved_partitions = len(list((directory / TAG).glob("zero_pp_rank_*_mp_rank_00_optim_states.pt")))

        def layout(zero: int, tp: int, pp: int, sp: int, partitions: int) -> str:
            return (f"ZeRO-{zero}, tp={tp}, pp={pp}" + (f", sp={sp}" if sp > 1 else "")
                    + (f", {partitions} ZeRO partitions" if zero else ""))

        t = self.topology
        here = layout(self.cfg.parallel.zero_stage, t.tp, t.pp, t.sp, t.dp * t.sp)
        there = layout(saved.zero_stage, saved.tp, saved.pp, saved.sp, saved_partitions)
        if here != there:
            raise BigtrainError(f"{directory} holds DeepSpeed state for {there}, this run is {here}: resume from "
                                f"`bigtrain convert reshard {directory} OUT` with this run's parallel.* settings")
