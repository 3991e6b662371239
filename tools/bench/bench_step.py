"""Training-step tokens/s of bigtrain's engines vs Hugging Face `LlamaForCausalLM` with the same
architecture, shapes, weights and batches, the sides taking turns.

    python tools/bench/bench_step.py --size 10m --sides hf bigtrain deepspeed [--repeats 5]
    python tools/bench/bench_step.py --config configs/125m.yaml --device cuda --sides hf

A step is forward + backward + gradient clipping (1.0) + AdamW over `--grad-accum` micro-batches
of [micro_batch, seq_len + 1] tokens. HF runs as its `Trainer` would: `model(input_ids, labels)`
with sdpa attention, torch AdamW (fused, Trainer's default since torch 2.8) over the same
decay/no-decay groups, `clip_grad_norm_`, bf16 autocast on CUDA. A side is `hf`, `bigtrain`
(the local engine) or `deepspeed` (ZeRO-1, world size 1), optionally followed by config
overrides: `bigtrain,train.compile=true`. Before timing, every side's first loss must equal HF's
(same weights, same batch): the architectures are the same. Each side lives in a process of its
own (built as `bigtrain train` builds it, with its process-wide settings: threads, host
allocator, process group) and reports its own CPU time. The sides take turns for `--repeats`
rounds of `--steps` steps, the order alternating; a side's figure is its median round, so a
neighbour that slows one round slows every side of it alike.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from statistics import median

import torch
from common import load_average, record

from bigtrain.config import Config, ModelConfig, load_config
from bigtrain.engine.device import autocast_for, resolve_precision
from bigtrain.engine.local import local_engine
from bigtrain.engine.optimizer import build_adamw
from bigtrain.engine.update_gate import UpdateGate
from bigtrain.model import Llama, count_params, flops_per_token
from bigtrain.train.host_memory import reuse_freed_memory
from bigtrain.train.loop import set_determinism
from bigtrain.train.metrics import peak_flops

SIZES = {  # the two CPU shapes: ~10M parameters (GQA, untied) and ~50M (MHA, tied 32k vocabulary)
    "10m": {"vocab_size": 8192, "d_model": 256, "n_layers": 8, "n_heads": 4, "n_kv_heads": 2},
    "50m": {"vocab_size": 32000, "d_model": 512, "n_layers": 10, "n_heads": 8, "n_kv_heads": None,
            "tie_embeddings": True},
}


def hf_name(name: str, n_layers: int) -> str:
    """bigtrain parameter name → `LlamaForCausalLM` name (layers[0] embeds, layers[-1] is the head)."""
    _, index, rest = name.split(".", 2)
    i = int(index)
    if i == 0:
        return f"model.{rest}"
    if i == n_layers + 1:
        return "lm_head.weight" if rest == "lm_head.weight" else f"model.{rest}"
    return f"model.layers.{i - 1}.{rest}"


def hf_model(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False, hidden_act="silu",
        attn_implementation="sdpa", torch_dtype=torch.float32,
    )
    model = LlamaForCausalLM(config)
    model.load_state_dict({hf_name(k, cfg.n_layers): v for k, v in state.items()}, strict=not cfg.tie_embeddings)
    return model


class HFSide:
    """`LlamaForCausalLM` trained the way HF's `Trainer` does it."""

    def __init__(self, cfg: Config, state: dict[str, torch.Tensor], device: torch.device):
        self.model = hf_model(cfg.model, state).to(device)
        self.optimizer = build_adamw(self.model, cfg.train)  # fused AdamW, decay/no-decay groups
        self.device, self.clip = device, cfg.train.grad_clip
        self.precision = resolve_precision(cfg.train.precision, device, "local")

    def train_step(self, micro_batches: list[torch.Tensor], lr: float) -> torch.Tensor:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        for batch in micro_batches:
            tokens = batch.to(self.device, non_blocking=True)
            inputs, targets = tokens[:, :-1], tokens[:, 1:].contiguous()  # as a collator gives them
            with autocast_for(self.device, self.precision):
                loss = self.model(input_ids=inputs, labels=targets, shift_labels=targets).loss
            (loss / len(micro_batches)).backward()
            total += loss.detach() / len(micro_batches)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total


class BigtrainSide:
    """The local engine or the DeepSpeed engine, built as `bigtrain train` builds them."""

    def __init__(self, cfg: Config, state: dict[str, torch.Tensor]):
        model = Llama(cfg.model)
        model.load_state_dict(state)
        if cfg.parallel.engine == "local":
            self.engine = local_engine(model, cfg.train)
        else:
            from bigtrain.engine.deepspeed.engine import deepspeed_engine
            from bigtrain.engine.deepspeed.grid import init_topology
            from bigtrain.engine.deepspeed.stages import owned_layers

            topology = init_topology(cfg)
            self.engine = deepspeed_engine(owned_layers(model, topology), cfg, topology, UpdateGate.from_config(cfg.train))

    def train_step(self, micro_batches: list[torch.Tensor], lr: float) -> torch.Tensor:
        return self.engine.train_step(micro_batches, lr).loss


def single_process_env() -> None:
    """torch.distributed variables for a world of one, on a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def side_config(base: list[str], spec: str) -> tuple[str, Config]:
    """`engine[,key=value...]` → (label, config)."""
    engine, *overrides = spec.split(",")
    if engine not in ("hf", "bigtrain", "deepspeed"):
        raise SystemExit(f"unknown side {engine!r}: use hf, bigtrain or deepspeed")
    layout = ["parallel.engine=deepspeed", "parallel.zero_stage=1"] if engine == "deepspeed" else []
    return spec, load_config(None, [*base, *layout, *overrides])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Setup:
    base: list[str]  # config overrides shared by every side (shape, batch, optimiser)
    device: str
    threads: int | None
    grad_accum: int
    warmup: int


def serve(conn, spec: str, setup: Setup) -> None:
    """A side's process: build it as `bigtrain train` would (HF as its `Trainer` would), take the
    first step and the warm-up, report, then time one round per request until told to stop."""
    try:
        if setup.threads:
            torch.set_num_threads(setup.threads)
        _, cfg = side_config(setup.base, spec)
        is_hf = spec.split(",")[0] == "hf"
        if cfg.parallel.engine == "deepspeed":
            single_process_env()
        set_determinism(0, cfg.train)
        if cfg.train.reuse_host_memory and not is_hf:
            reuse_freed_memory()
        device = torch.device(setup.device)
        state = Llama(cfg.model).state_dict()  # seeded: the same weights in every side's process
        run = HFSide(cfg, state, device) if is_hf else BigtrainSide(cfg, state)
        gen = torch.Generator().manual_seed(1)  # the same batches in every side's process
        shape = (cfg.data.micro_batch, cfg.data.seq_len + 1)
        batches = [torch.randint(0, cfg.model.vocab_size, shape, generator=gen) for _ in range(setup.grad_accum * 4)]
        if device.type == "cuda":
            batches = [b.pin_memory() for b in batches]

        def step(i: int) -> torch.Tensor:
            start = i * setup.grad_accum % len(batches)
            return run.train_step(batches[start:start + setup.grad_accum], 3e-4)

        start = time.perf_counter()
        first = float(step(0))  # includes torch.compile's compilation
        first_s = time.perf_counter() - start
        for i in range(1, setup.warmup):
            step(i)
        sync(device)
        conn.send((first, first_s))
        while (steps := conn.recv()) is not None:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            start, cpu = time.perf_counter(), time.process_time()
            for i in range(steps):
                loss = step(i)
            float(loss)  # the loop's only host sync, at the end of the round
            sync(device)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            conn.send((time.perf_counter() - start, time.process_time() - cpu, peak))
    except Exception:
        conn.send(traceback.format_exc())


class SideProcess:
    """One side in a process of its own: process-wide settings (threads, bigtrain's host
    allocator, DeepSpeed's process group) stay its own, and so do its CPU time and peak memory."""

    def __init__(self, spec: str, setup: Setup):
        self.spec = spec
        self.conn, child = mp.get_context("spawn").Pipe()
        self.process = mp.get_context("spawn").Process(target=serve, args=(child, spec, setup), daemon=True)
        self.process.start()
        child.close()  # the side's end: a side that dies closes the pipe

    def reply(self):
        try:
            answer = self.conn.recv()
        except EOFError:
            self.process.join()
            raise SystemExit(f"side {self.spec} died (exit code {self.process.exitcode})") from None
        if isinstance(answer, str):
            raise SystemExit(f"side {self.spec} failed:\n{answer}")
        return answer

    def round(self, steps: int) -> tuple[float, float, float | None]:
        self.conn.send(steps)
        return self.reply()

    def stop(self) -> None:
        self.conn.send(None)
        self.process.join()


def dotted(prefix: str, tree: dict) -> list[str]:
    """`prefix.key=value` overrides for every set value of a config section (sub-sections flattened)."""
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out += dotted(f"{prefix}.{key}", value)
        elif value is not None:
            out.append(f"{prefix}.{key}={value}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--size", choices=sorted(SIZES), default="10m", help="a CPU shape")
    shape.add_argument("--config", type=Path, help="take the model shape from a config file")
    parser.add_argument("--sides", nargs="+", default=["hf", "bigtrain"])
    parser.add_argument("--seq-len", type=int, default=None, help="default: 256, or the config's")
    parser.add_argument("--micro-batch", type=int, default=None, help="default: 8, or the config's")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side per round")
    parser.add_argument("--repeats", type=int, default=5, help="rounds; each side's median is kept")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()

    if args.config:
        file_cfg = load_config(args.config)
        model_keys = dotted("model", file_cfg.to_dict()["model"])
        seq_len, micro_batch, name = file_cfg.data.seq_len, file_cfg.data.micro_batch, args.config.stem
    else:
        model_keys = [f"model.{k}={v}" for k, v in SIZES[args.size].items() if v is not None]
        seq_len, micro_batch, name = 256, 8, args.size
    seq_len, micro_batch = args.seq_len or seq_len, args.micro_batch or micro_batch
    base = [*model_keys, f"model.max_seq_len={seq_len}", f"data.seq_len={seq_len}",
            f"data.micro_batch={micro_batch}", f"train.grad_accum={args.grad_accum}",
            f"train.device={args.device}", "train.lr=3e-4", "train.grad_clip=1.0"]
    reference = [side_config(base, spec)[1] for spec in args.sides][0]  # checks every side's name first
    setup = Setup(base, args.device, args.threads, args.grad_accum, args.warmup)
    sides, first, first_s = {}, {}, {}
    for spec in args.sides:  # one at a time: builds and compilations do not overlap
        sides[spec] = SideProcess(spec, setup)
        first[spec], first_s[spec] = sides[spec].reply()
    base_loss = first[args.sides[0]]
    for label, loss in first.items():  # same weights and batch: the same loss, or the shapes differ
        tolerance = 1e-4 if args.device == "cpu" else 2e-2
        if abs(loss - base_loss) > tolerance * base_loss:
            raise SystemExit(f"{label}: first loss {loss:.6f} differs from {base_loss:.6f}")

    tokens_per_step = args.grad_accum * micro_batch * seq_len
    rates: dict[str, list[float]] = {label: [] for label in sides}
    cpu_rates: dict[str, list[float]] = {label: [] for label in sides}
    peak_mem: dict[str, float] = {}
    load = [load_average()]
    for r in range(args.repeats):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))  # alternate who goes first
        for label in order:
            wall, cpu, peak = sides[label].round(args.steps)
            rates[label].append(args.steps * tokens_per_step / wall)
            cpu_rates[label].append(args.steps * tokens_per_step / cpu)
            if peak is not None:
                peak_mem[label] = max(peak_mem.get(label, 0.0), peak)
        load.append(load_average())
    for side in sides.values():
        side.stop()

    device = torch.device(args.device)
    peak = peak_flops(device, None)
    flops = flops_per_token(reference.model, seq_len)
    result = {}
    for label, values in rates.items():
        result[label] = {"tokens_per_s": round(median(values)), "rounds": [round(v) for v in values],
                         "tokens_per_cpu_s": round(median(cpu_rates[label])), "first_loss": round(first[label], 6),
                         "first_step_s": round(first_s[label], 1)}
        if peak:
            result[label]["mfu"] = round(median(values) * flops / peak, 4)
            result[label]["mfu_peak_tflops"] = peak / 1e12  # the bf16 dense peak, fp8 sides included
        if label in peak_mem:
            result[label]["peak_mem_gib"] = round(peak_mem[label], 2)
    hf = next((label for label in result if label.split(",")[0] == "hf"), None)
    if hf:
        for label in result:
            for key in ("tokens_per_s", "tokens_per_cpu_s"):
                result[label][f"vs_hf_{key[7:]}"] = round(result[label][key] / result[hf][key], 3)
    record("step", {
        "model": name, "params": count_params(reference.model).total, "seq_len": seq_len,
        "micro_batch": micro_batch, "grad_accum": args.grad_accum, "steps": args.steps,
        "repeats": args.repeats, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": args.threads or torch.get_num_threads(), "torch": torch.__version__, "load_average_1m": load,
        "sides": result,
    })


if __name__ == "__main__":
    main()
