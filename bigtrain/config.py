"""The typed config tree: YAML files plus `a.b.c=value` overrides, validated against dataclasses.

Each section belongs to the module that uses it. An unknown key, a value of the wrong type or a
number outside its key's range is a `BigtrainError` that names the key (and, for unknown keys, the
nearest valid one). Every numeric key declares its range where it is defined, with `ranged`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from bigtrain.errors import BigtrainError

RANGE = "range"  # the field-metadata entry that holds a numeric key's ValueRange
REQUIRED = dataclasses.MISSING  # `ranged(REQUIRED, ...)`: a key with no default, which its section must set


@dataclass(frozen=True)
class ValueRange:
    """The values a numeric key admits: `ge`/`le` are inclusive bounds, `gt`/`lt` strict ones."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def __post_init__(self) -> None:
        if (self.gt is not None and self.ge is not None) or (self.lt is not None and self.le is not None):
            raise ValueError("give at most one lower bound (gt or ge) and one upper bound (lt or le)")
        if self.gt is None and self.ge is None and self.lt is None and self.le is None:
            raise ValueError("a range needs at least one bound")

    def admits(self, value: float) -> bool:  # NaN is admitted by no range: every comparison is false
        return ((self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge)
                and (self.lt is None or value < self.lt) and (self.le is None or value <= self.le))

    def __str__(self) -> str:  # "> 0", ">= 1", "in [0, 1)"
        if (self.gt, self.ge) != (None, None) and (self.lt, self.le) != (None, None):
            low = f"[{self.ge}" if self.ge is not None else f"({self.gt}"
            high = f"{self.le}]" if self.le is not None else f"{self.lt})"
            return f"in {low}, {high}"
        bounds = [(">", self.gt), (">=", self.ge), ("<", self.lt), ("<=", self.le)]
        return next(f"{op} {bound}" for op, bound in bounds if bound is not None)


def ranged(default: Any, *, gt: float | None = None, ge: float | None = None,
           lt: float | None = None, le: float | None = None) -> Any:
    """A dataclass field whose value (when not None) must lie in the given range."""
    return field(default=default, metadata={RANGE: ValueRange(gt=gt, ge=ge, lt=lt, le=le)})


@dataclass
class MoEConfig:
    """Mixture-of-Experts feed-forward blocks (bigtrain/model/moe.py); `experts: 0` is a dense model.
    Block l (from 0) is MoE when l >= first_dense and (l + 1) % every == 0 (Qwen3-MoE's rule)."""

    experts: int = ranged(0, ge=0)  # routed experts per MoE block
    top_k: int = ranged(2, ge=1)  # experts each token is routed to
    ffn_hidden: int | None = ranged(None, ge=1)  # each expert's SwiGLU width; None: the dense width
    shared_experts: int = ranged(0, ge=0)  # experts every token goes through (one MLP of shared_experts × ffn_hidden)
    every: int = ranged(1, ge=1)  # every k-th block is MoE
    first_dense: int = ranged(0, ge=0)  # leading blocks that stay dense
    normalize_top_k: bool = True  # renormalise the top-k probabilities to sum to 1 (Qwen3-MoE's norm_topk_prob)
    aux_loss: float = ranged(0.01, ge=0)  # load-balancing loss coefficient (per MoE block)
    z_loss: float = ranged(0.0, ge=0)  # router z-loss coefficient (per MoE block)
    capacity_factor: float | None = ranged(None, gt=0)  # None: dropless; else each expert takes at most this × its even share


@dataclass
class RopeScalingConfig:
    """RoPE scaling to extend a trained context (bigtrain/model/rope.py), as in Hugging Face's
    `rope_scaling`: Llama 3.1's frequency-band rule (`llama3`) or YaRN (`yarn`). The defaults are
    transformers'; each parameter after the first three belongs to one type."""

    type: Literal["llama3", "yarn"]
    factor: float = ranged(REQUIRED, ge=1)  # context extension ratio (usually max_seq_len / original_max_seq_len)
    original_max_seq_len: int = ranged(REQUIRED, ge=1)  # the context the weights were trained at
    low_freq_factor: float = ranged(1.0, gt=0)  # llama3: wavelengths above original / this are divided by factor
    high_freq_factor: float = ranged(4.0, gt=0)  # llama3: wavelengths below original / this are kept
    beta_fast: float = ranged(32.0, gt=0)  # yarn: dimensions turning more often over the original context are kept
    beta_slow: float = ranged(1.0, gt=0)  # yarn: dimensions turning less often are divided by factor
    attention_factor: float | None = ranged(None, gt=0)  # yarn: cos/sin scale; None: 0.1·ln(factor)+1 (or from mscale)
    mscale: float | None = ranged(None, gt=0)  # yarn, with mscale_all_dim: attention factor as their ratio (DeepSeek)
    mscale_all_dim: float | None = ranged(None, gt=0)  # yarn
    truncate: bool = True  # yarn: round the ramp's ends to whole dimensions

    PARAMETERS = {"llama3": ("low_freq_factor", "high_freq_factor"),
                  "yarn": ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate")}


@dataclass
class ModelConfig:
    """Shape of the Llama-style decoder. The defaults are the `tiny` model of the quickstart."""

    vocab_size: int = ranged(4096, ge=1)
    d_model: int = ranged(256, ge=1)
    n_layers: int = ranged(4, ge=1)
    n_heads: int = ranged(4, ge=1)
    n_kv_heads: int | None = ranged(2, ge=1)  # None: same as n_heads (no grouped-query attention)
    head_dim: int | None = ranged(None, ge=1)  # per attention head; None: d_model / n_heads (reads give the effective value)
    ffn_hidden: int | None = ranged(None, ge=1)  # None: Llama's rule, 8/3·d_model rounded up to multiple_of
    multiple_of: int = ranged(256, ge=1)
    ffn_dim_multiplier: float | None = ranged(None, gt=0)
    max_seq_len: int = ranged(256, ge=1)
    rope_theta: float = ranged(10000.0, gt=0)
    rope_scaling: RopeScalingConfig | None = None  # None: plain RoPE
    norm_eps: float = ranged(1e-5, gt=0)
    tie_embeddings: bool = False
    init_std: float = ranged(0.02, gt=0)
    init_from: str | None = None  # start from this checkpoint's weights (e.g. `bigtrain convert from-hf`)
    qk_norm: bool = False  # RMSNorm of each query and key head before RoPE (Qwen3)
    parametrization: Literal["standard", "mup"] = "standard"  # mup: µP (bigtrain/model/mup.py, docs/scaling.md)
    mup_base_width: int = ranged(256, ge=1)  # µP: the d_model whose init and learning rates the others inherit
    moe: MoEConfig = field(default_factory=MoEConfig)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        hidden = int(2 * 4 * self.d_model / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * -(-hidden // self.multiple_of)

    @property
    def expert_ffn_dim(self) -> int:
        return self.moe.ffn_hidden or self.ffn_dim

    def is_moe_block(self, block: int) -> bool:
        """Whether block `block` (from 0) has a Mixture-of-Experts feed-forward."""
        moe = self.moe
        return moe.experts > 0 and block >= moe.first_dense and (block + 1) % moe.every == 0


def _get_head_dim(self: ModelConfig) -> int:
    return self._head_dim if self._head_dim is not None else self.d_model // self.n_heads


def _set_head_dim(self: ModelConfig, value: int | None) -> None:
    self._head_dim = value


# The field `head_dim` stores the configured value (None or an int) in `_head_dim`; reading it gives the
# effective width, so attention, RoPE, FLOPs and the planner need no case for None.
ModelConfig.head_dim = property(_get_head_dim, _set_head_dim)


@dataclass
class SourceConfig:
    """One dataset of a mixture and its sampling weight (relative to the others): a prepared
    directory (`path`, Arrow backend) or an MDS dataset (`remote`, streaming backend)."""

    path: str = ""  # required with the Arrow backend; an empty path is refused then
    weight: float = ranged(1.0, gt=0)
    remote: str | None = None  # required with the streaming backend: s3://, gs:// or a directory


@dataclass
class SeqLenWarmupConfig:
    """Windows grow from `start` tokens to `data.seq_len` over `steps` steps (bigtrain/data/seq_len_warmup.py)."""

    start: int = ranged(256, ge=1)  # seq_len / start must be a power of two
    steps: int = ranged(1000, ge=1)


@dataclass
class DataConfig:
    """Where the prepared shards are, how they are cut into batches, and how they are checked.

    The Arrow backend trains on `sources` when given (a weighted mixture of `path`s), otherwise on
    `path`; the streaming backend reads MDS windows from `remote` (s3://, gs://, or a directory)
    through the `local` cache, or from a weighted mixture of `sources` given by their `remote`,
    each cached in its own sub-directory of `local`. Validation uses `val_path` or holds out the
    last `val_fraction` of every training dataset (Arrow backend only).
    """

    path: str = "data/train"
    val_path: str | None = None
    val_fraction: float = ranged(0.0, ge=0, lt=1)
    sources: list[SourceConfig] = field(default_factory=list)
    backend: Literal["arrow", "streaming"] = "arrow"
    remote: str | None = None
    local: str | None = None
    tokenizer: str | None = None  # when set, data tokenized with another tokenizer is refused
    verify_checksums: bool = True  # sha256 of every shard when training starts
    seq_len: int = ranged(256, ge=1)
    micro_batch: int = ranged(16, ge=1)
    shuffle: bool = True
    prefetch: bool = True  # read the next step's batches in a background thread (pinned on CUDA)
    document_masking: bool = False  # a token attends only to its own document of a packed window (docs/data.md)
    reset_positions: bool = False  # with document_masking: RoPE positions restart at each document
    seq_len_warmup: SeqLenWarmupConfig | None = None  # shorter windows first, same tokens per step
    download_retry: int = ranged(2, ge=0)  # streaming: tries after the first to read a remote object
    download_timeout: float = ranged(60.0, gt=0)  # streaming: seconds for each try (connect, each read)


@dataclass
class TrainConfig:
    """Optimiser, schedule, loop length, device, precision and bad-step policy, for every engine."""

    steps: int = ranged(1000, ge=1)
    max_minutes: float | None = ranged(None, ge=0)  # stop (and save) at the first logging step past this wall time
    lr: float = ranged(3e-3, gt=0)
    min_lr_ratio: float = ranged(0.1, ge=0, le=1)
    warmup_steps: int = ranged(50, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = ranged(0.1, ge=0)
    beta1: float = ranged(0.9, ge=0, lt=1)
    beta2: float = ranged(0.95, ge=0, lt=1)
    eps: float = ranged(1e-8, gt=0)
    grad_clip: float | None = ranged(1.0, gt=0)  # None: no clipping
    z_loss: float = ranged(0.0, ge=0)  # PaLM's z-loss of the output logits: coeff · mean logsumexp² (e.g. 1e-4); 0: off
    grad_accum: int = ranged(1, ge=1)
    global_batch: int | None = ranged(None, ge=1)  # windows per step; must equal micro_batch × grad_accum × dp
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16", "fp8"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU; fp8: torchao
    # bf16 parameters, fp32 master weights in the optimizer, fp32 gradient accumulation (Megatron's
    # main_grad); local engine in bf16 (DeepSpeed's bf16 keeps fp32 masters already)
    master_weights: bool = False
    deterministic: Literal["auto", True, False] = "auto"  # auto: on for CPU, off for CUDA
    nonfinite: Literal["skip", "stop"] = "skip"  # a bad step (NaN/Inf or spike): skip its update, or stop
    max_bad_steps: int = ranged(10, ge=1)  # with skip: stop after this many bad steps in a row
    spike_window: int = ranged(0, ge=0)  # accepted steps a spike is measured against; 0: no spike detection
    spike_sigma: float = ranged(6.0, gt=0)  # a loss or gradient norm above mean + this × std of the window is a spike
    spike_signals: Literal["auto", "loss", "grad_norm", "both"] = "auto"  # auto: both, the gradient norm alone with pp > 1
    rollback_after: int | None = ranged(None, ge=1)  # this many bad steps in a row: reload the last checkpoint; None: stop
    rollback_skip_steps: int | None = ranged(None, ge=0)  # steps' worth of batches a rollback skips; None: the bad run's length
    max_rollbacks: int = ranged(3, ge=1)  # rollbacks to the same checkpoint before the run stops
    compile: Literal["auto", True, False] = "auto"  # torch.compile every block; auto: on CUDA only (docs/benchmarks.md)
    adamw_impl: Literal["fused", "foreach", "for-loop"] = "fused"  # torch AdamW's kernel choice
    # muon: Newton–Schulz orthogonalised momentum for the blocks' hidden matrices, AdamW for the rest;
    # AdamW's lr and weight_decay carry over (Moonlight's RMS matching, bigtrain/engine/muon.py)
    optimizer: Literal["adamw", "muon"] = "adamw"
    muon_momentum: float = ranged(0.95, ge=0, lt=1)  # Muon's Nesterov momentum
    reuse_host_memory: bool = True  # glibc keeps freed blocks for the next step (bigtrain/train/host_memory.py)
    manual_gc: bool = True  # Python's automatic GC off during training, a collection at logging steps (torchtitan)


@dataclass
class ParallelConfig:
    """How a run is laid out over processes: world size = pp × dp × sp × tp (dp is what is left)."""

    engine: Literal["local", "deepspeed"] = "local"  # local: one process, no DeepSpeed (debug mode)
    tp: int = ranged(1, ge=1)  # tensor-parallel degree (Megatron-style, inside a node)
    tp_sequence_parallel: bool = True  # with tp > 1: norms/residuals hold seq_len/tp tokens per rank
    pp: int = ranged(1, ge=1)  # pipeline stages (DeepSpeed's pipeline engine, 1F1B)
    sp: int = ranged(1, ge=1)  # sequence-parallel degree (DeepSpeed-Ulysses: each rank holds seq_len / sp tokens)
    ep: int = ranged(1, ge=1)  # expert-parallel degree: each of ep data-parallel ranks holds experts / ep experts
    zero_stage: Literal[0, 1, 2, 3] = 0
    offload_optimizer: bool = False  # ZeRO optimizer states in CPU memory
    activation_checkpointing: Literal[False, True, "full", "selective"] = False  # true: full (see docs/benchmarks.md)
    activation_checkpointing_every: int = ranged(1, ge=1)  # checkpoint every k-th block
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl with CUDA, else gloo
    timeout_minutes: float = ranged(10.0, gt=0)  # a collective waiting longer ends the run (a rank died or hung)
    deepspeed_overrides: str | None = None  # a JSON file merged into the generated DeepSpeed config


@dataclass
class CheckpointConfig:
    """Local checkpoints under `<run dir>/checkpoints/` and their mirror in object storage (`remote`)."""

    every: int = ranged(500, ge=1)
    keep_last: int | None = ranged(None, ge=1)  # None keeps every checkpoint
    verify: bool = True  # check every file's crc32c when resuming (each rank checks a share)
    remote: str | None = None  # mirror every checkpoint to s3://bucket/prefix, gs://bucket/prefix or a directory
    remote_retries: int = ranged(5, ge=0)  # retries of a failed upload/download, backoff 1, 2, 4 … s (at most 60)
    # `checkpoint.async`: copy each rank's share to host memory at the save step and write it in the
    # background (the loop waits only for the copy; the final and preemption saves wait for the write)
    async_save: bool = False


@dataclass
class WandbConfig:
    """Weights & Biases: rank 0 logs every record; the run id is kept in checkpoints."""

    mode: Literal["disabled", "online", "offline"] = "disabled"
    project: str = "bigtrain"
    entity: str | None = None
    name: str | None = None  # None: run.name
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LogConfig:
    every: int = ranged(10, ge=1)
    peak_tflops: float | None = ranged(None, gt=0)  # device peak for MFU; None looks the device up
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class EvalConfig:
    """lm-evaluation-harness tasks during training (bigtrain/eval/harness.py): names (shipped with
    bigtrain, or of lm-eval's registry), task YAMLs or directories of them; every data-parallel
    rank scores a share of the documents."""

    val_every: int = ranged(200, ge=1)  # steps between validation losses (also before the first step and at the end)
    val_batches: int = ranged(20, ge=1)  # validation covers val_batches × global batch windows
    tasks: list[str] = field(default_factory=list)  # empty: no task evaluation
    every: int = ranged(1000, ge=1)  # steps between evaluations (also before the first step and at the end)
    limit: int | None = ranged(None, ge=1)  # documents per task; None: all
    num_fewshot: int | None = ranged(None, ge=0)  # None: each task's own default
    batch_size: int = ranged(32, ge=1)  # sequences per forward pass


@dataclass
class RunConfig:
    name: str = "run"
    dir: str | None = None  # None: runs/<name>
    seed: int = ranged(1234, ge=0, le=2**32 - 1)
    resume: str | None = None  # "auto" (from checkpoints/latest if any) or a checkpoint path
    lock: bool = True  # rank 0 holds an OS lock on <dir>/.lock: one writer per run (bigtrain/train/run_lock.py)
    wait_lock: float = ranged(0.0, ge=0)  # seconds to wait for another process to release the lock

    @property
    def path(self) -> Path:
        return Path(self.dir) if self.dir else Path("runs") / self.name


@dataclass
class Config:
    """The whole tree. Its defaults are the `tiny` config (configs/tiny.yaml spells them out)."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> Config:
        """Check every numeric key against its range, then relations between keys."""
        _check_ranges(self, "")
        m, d = self.model, self.data
        checks = [
            (m._head_dim is not None or m.d_model % m.n_heads == 0,
             "model.d_model must be divisible by model.n_heads (or set model.head_dim)"),
            (m.n_heads % m.kv_heads == 0, "model.n_heads must be divisible by model.n_kv_heads"),
            (m.head_dim % 2 == 0, "model.head_dim must be even (RoPE)" if m._head_dim is not None
             else "model.d_model / model.n_heads must be even (RoPE)"),
            (d.seq_len <= m.max_seq_len, "data.seq_len must not exceed model.max_seq_len"),
            (d.document_masking or not d.reset_positions, "data.reset_positions needs data.document_masking=true"),
            (d.seq_len_warmup is None or _power_of_two(d.seq_len, d.seq_len_warmup.start),
             f"data.seq_len / data.seq_len_warmup.start must be a power of two, got {d.seq_len} / "
             f"{d.seq_len_warmup.start if d.seq_len_warmup else None}"),
            *_rope_scaling_checks(m),
            (m.moe.experts == 0 or m.moe.top_k <= m.moe.experts,
             f"model.moe.top_k={m.moe.top_k} exceeds model.moe.experts={m.moe.experts}"),
            (m.moe.experts == 0 or self.parallel.ep == 1 or m.moe.experts % self.parallel.ep == 0,
             f"model.moe.experts={m.moe.experts} is not divisible by parallel.ep={self.parallel.ep}"),
            (m.moe.experts > 0 or self.parallel.ep == 1, "parallel.ep > 1 needs model.moe.experts > 0"),
            (self.parallel.pp == 1 or not self.train.spike_window or self.train.spike_signals in ("auto", "grad_norm"),
             f"train.spike_signals={self.train.spike_signals} needs parallel.pp=1 (the pipeline engine updates before "
             "the loss is known); use auto or grad_norm"),
            (self.train.rollback_after is None or self.train.nonfinite == "skip",
             "train.rollback_after needs train.nonfinite=skip (stop ends the run at the first bad step)"),
            (not self.train.master_weights or self.parallel.engine == "local",
             "train.master_weights is for parallel.engine=local (DeepSpeed's bf16 keeps fp32 master weights already)"),
            (m.moe.experts == 0 or self.train.precision != "fp16",
             "model.moe needs train.precision bf16 or fp32 (fp16's loss scale would not reach the auxiliary losses' gradient)"),
        ]
        for ok, message in checks:
            if not ok:
                raise BigtrainError(message)
        return self

    def to_dict(self) -> dict[str, Any]:
        tree = dataclasses.asdict(self)
        tree["model"]["head_dim"] = self.model._head_dim  # as configured: None stays d_model / n_heads
        return tree


def _rope_scaling_checks(m: ModelConfig) -> list[tuple[bool, str]]:
    """(ok, message) pairs for `model.rope_scaling` against the rest of the model section."""
    r = m.rope_scaling
    if r is None:
        return []
    default = RopeScalingConfig(r.type, r.factor, r.original_max_seq_len)
    others = [key for kind, keys in RopeScalingConfig.PARAMETERS.items() if kind != r.type for key in keys]
    return [
        (r.original_max_seq_len <= m.max_seq_len, f"model.rope_scaling.original_max_seq_len={r.original_max_seq_len} "
         f"exceeds model.max_seq_len={m.max_seq_len}"),
        *((getattr(r, key) == getattr(default, key), f"model.rope_scaling.{key} does not apply to type {r.type}")
          for key in others),
        (r.high_freq_factor > r.low_freq_factor,
         "model.rope_scaling.high_freq_factor must exceed model.rope_scaling.low_freq_factor"),
        (r.beta_fast > r.beta_slow, "model.rope_scaling.beta_fast must exceed model.rope_scaling.beta_slow"),
    ]


def _power_of_two(numerator: int, denominator: int) -> bool:
    ratio = numerator // denominator
    return numerator % denominator == 0 and ratio & (ratio - 1) == 0


def _check_ranges(node: Any, prefix: str) -> None:
    """Raise, naming the key, at the first set numeric value outside its field's declared range."""
    for f in dataclasses.fields(node):
        key, value = prefix + f.name, getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            _check_ranges(value, key + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    _check_ranges(item, f"{key}[{i}].")
        elif value is not None and RANGE in f.metadata and not f.metadata[RANGE].admits(value):
            raise BigtrainError(f"{key}={value!r} must be {f.metadata[RANGE]}")


def read_yaml_mapping(path: str | Path, kind: str, holds: str) -> dict[str, Any]:
    """A YAML file's top-level mapping, or a one-line error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise BigtrainError(f"{kind} not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise BigtrainError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise BigtrainError(f"{path} must hold a mapping of {holds}")
    return raw


MOVED_KEYS = {"train.eval_every": "eval.val_every", "train.eval_batches": "eval.val_batches"}  # old → new
KEYWORD_KEYS = {"checkpoint.async": "async_save"}  # keys that are Python keywords → their field
REPLACED_KEYS = {  # old key → what replaced it; a saved config's old value (or a null) is dropped
    "train.spike_factor": "train.spike_window and train.spike_sigma (a step whose loss or gradient norm exceeds "
                          "the mean + sigma × std of a rolling window is skipped; docs/checkpoints.md)",
}


def load_config(path: str | Path | None = None, overrides: list[str] = (), saved: bool = False) -> Config:
    """Read a YAML config (or start from defaults), apply `a.b=value` overrides, validate. A
    `saved` config is one bigtrain wrote (a checkpoint's): keys that moved since move along."""
    raw = read_yaml_mapping(path, "config file", "config sections") if path is not None else {}
    if saved:
        _move_keys(raw)
        _drop_replaced_keys(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BigtrainError(f"override {item!r} is not of the form key=value")
        _set_dotted(raw, key.strip(), yaml.safe_load(value) if value.strip() else None)
    return from_dict(raw)


def from_dict(raw: dict[str, Any]) -> Config:
    return _build(Config, raw, "").validate()


def _move_keys(raw: dict[str, Any]) -> None:
    for old, new in MOVED_KEYS.items():
        (old_section, old_key), (new_section, new_key) = old.split("."), new.split(".")
        section = raw.get(old_section)
        if isinstance(section, dict) and old_key in section:
            raw.setdefault(new_section, {}).setdefault(new_key, section.pop(old_key))


def _drop_replaced_keys(raw: dict[str, Any]) -> None:
    for old in REPLACED_KEYS:
        section, key = old.split(".")
        if isinstance(raw.get(section), dict):
            raw[section].pop(key, None)


def save_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        node = tree.setdefault(part, {})
        if not isinstance(node, dict):
            raise BigtrainError(f"override {key}: {part} is not a section")
        tree = node
    tree[leaf] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise BigtrainError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    raw = {KEYWORD_KEYS.get(f"{prefix}{key}", key): value for key, value in raw.items()}
    for key in raw:
        if f"{prefix}{key}" in MOVED_KEYS:
            raise BigtrainError(f"config key {prefix}{key} is now {MOVED_KEYS[prefix + key]}")
        if f"{prefix}{key}" in REPLACED_KEYS and raw[key] is None:
            continue  # an unset replaced key (configs written before it was replaced) means nothing
        if f"{prefix}{key}" in REPLACED_KEYS:
            raise BigtrainError(f"config key {prefix}{key} was replaced by {REPLACED_KEYS[prefix + key]}")
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix}{near[0]}?" if near else f"; valid keys: {', '.join(names)}"
            raise BigtrainError(f"unknown config key {prefix}{key}{hint}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            kwargs[f.name] = _coerce(hints[f.name], raw[f.name], prefix + f.name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise BigtrainError(f"config key {prefix}{f.name} is required")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """Return `value` as type `hint`, or raise an error naming `key` and the expected type."""
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise BigtrainError(f"{key} must be a list, got {value!r}")
        return [_coerce(args[0], item, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is Literal:  # by type too: 1 == True, so `in` would take 1 for True and True for 1
        if not any(value == a and type(value) is type(a) for a in args):
            raise BigtrainError(f"{key} must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if hint is float and isinstance(value, str):
        try:  # YAML reads 3e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise BigtrainError(f"{key} must be {hint.__name__}, got {value!r}")
    return value
