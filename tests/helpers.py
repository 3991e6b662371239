"""Small shared builders for tests: every test's run configs, environments and process helpers.
Test modules import these from here, never from one another."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from bigtrain.config import Config, ModelConfig, from_dict
from bigtrain.data.tokenizer import TextTokenizer

CPU_RANKS_ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
# for peak-RSS measurements: every large block mmap'd and returned at free, so the peak RSS of a
# process is the peak of its live tensors (glibc's dynamic threshold would keep freed ones mapped)
PEAK_ENV = {**os.environ, "OMP_NUM_THREADS": "2", "MALLOC_MMAP_THRESHOLD_": "65536"}


def torchrun(nproc: int, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone` of `args` on `nproc` CPU (gloo) ranks, which must all succeed
    (`env`: the ranks' environment, `CPU_RANKS_ENV` unless given)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env or CPU_RANKS_ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def poisoned(build_engine, steps, factor=float("nan")):
    """`build_engine` whose model's logits are scaled by `factor` in the given (1-based) training steps."""
    calls = 0

    def build_poisoned(*args, **kwargs):
        engine = build_engine(*args, **kwargs)

        def hook(module, args, output):
            nonlocal calls
            if module.training:
                calls += 1
                return output * factor if calls in steps else output
            return output

        engine.model.register_forward_hook(hook)
        return engine

    return build_poisoned


def step_windows(cfg: Config, steps: set[int], dp_rank: int = 0, dp_size: int = 1) -> list[torch.Tensor]:
    """The model inputs (every micro-batch's windows, without their last token) that data-parallel
    rank `dp_rank` trains on in the given (0-based) steps of `cfg`'s run."""
    from bigtrain.data.build import build_train_loader

    loader = build_train_loader(cfg.data, cfg.data.micro_batch, cfg.train.grad_accum, dp_rank=dp_rank,
                                dp_size=dp_size, seed=cfg.run.seed, model_vocab_size=cfg.model.vocab_size)
    windows = []
    for step in range(max(steps) + 1):
        batches = loader.next_step()
        if step in steps:
            windows += [batch[:, :-1] for batch in batches]
    return windows


def poisoned_windows(build_engine, windows: list[torch.Tensor], factor=float("nan")):
    """`build_engine` whose model's training loss is scaled by `factor` whenever its input is one of
    `windows` (bad data: whichever step draws it, in this run or a resumed one)."""
    def build_poisoned(*args, **kwargs):
        engine = build_engine(*args, **kwargs)

        def hook(module, args, output):
            if module.training and any(torch.equal(args[0].cpu(), w) for w in windows):
                return output * factor
            return output

        engine.model.register_forward_hook(hook)
        return engine

    return build_poisoned


def small_model_config(**overrides) -> ModelConfig:
    """A 2-layer model with grouped-query attention that runs in milliseconds."""
    shape = {"vocab_size": 97, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 16}
    return ModelConfig(**{**shape, **overrides})


def tiny_config(data, run_dir, *, val_every: int = 30, validate: bool = True, verify_checksums: bool = True,
                **train) -> Config:
    """A 60-step single-process run of a 2-layer model on `data` (train_dir, val_dir): seed 7,
    8 × 64 tokens a step, validation at step 0, every `val_every` steps and at the end, logs every
    10 steps. `train` overrides keys of the train section; `validate=False` leaves validation out
    and `verify_checksums=False` skips the shards' checksums (tests where only the steps matter)."""
    train_dir, val_dir = data
    cfg = from_dict({
        "run": {"name": "t", "dir": str(run_dir), "seed": 7},
        "model": {"vocab_size": 512, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64},
        "data": {"path": str(train_dir), "val_path": str(val_dir), "seq_len": 64, "micro_batch": 8},
        "train": {"steps": 60, "lr": 3e-3, "warmup_steps": 5, "device": "cpu", **train},
        "checkpoint": {"every": 1000},
        "log": {"every": 10},
        "eval": {"val_every": val_every, "val_batches": 4},
    })
    if not validate:
        cfg.data.val_path = None
    cfg.data.verify_checksums = verify_checksums
    return cfg


def ranks_config(data, run_dir, n: int = 3) -> dict:
    """A 2·`n`-step run for 2 ranks (global batch 8, 4 × 32 tokens a micro-batch), a checkpoint
    every `n` steps and a log line every step; a plain dict, to be written as YAML for a launch."""
    return {
        "run": {"name": "ckpt", "dir": str(run_dir), "seed": 5},
        "model": {"vocab_size": 512, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 32},
        "data": {"path": str(data[0]), "val_path": str(data[1]), "seq_len": 32, "micro_batch": 4},
        "train": {"steps": 2 * n, "lr": 3e-3, "warmup_steps": 1, "grad_clip": 1.0, "device": "cpu", "global_batch": 8},
        "checkpoint": {"every": n},
        "log": {"every": 1},
        "eval": {"val_every": 1000, "val_batches": 1},
    }


def parity_config(data, run_dir, steps: int = 5, global_batch: int = 8) -> dict:
    """The single-process reference run that every parallel layout must reproduce: a 4-layer model,
    `global_batch` windows of 32 tokens in one micro-batch, validation before and after."""
    return {
        "run": {"name": "parity", "dir": str(run_dir), "seed": 11},
        "model": {"vocab_size": 512, "d_model": 64, "n_layers": 4, "n_heads": 8, "n_kv_heads": 4, "max_seq_len": 32},
        "data": {"path": str(data[0]), "val_path": str(data[1]), "seq_len": 32, "micro_batch": global_batch},
        "train": {"steps": steps, "lr": 3e-3, "warmup_steps": 1, "grad_clip": 1.0, "device": "cpu",
                  "global_batch": global_batch},
        "checkpoint": {"every": 1000},
        "log": {"every": 1},
        "eval": {"val_every": 1000, "val_batches": 2},
    }


SWEEP_BASE = {
    "model": {"vocab_size": 512, "d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 32},
    "data": {"seq_len": 32, "micro_batch": 4},
    "train": {"lr": 3e-3, "warmup_steps": 2, "device": "cpu"},
    "checkpoint": {"every": 1000},
    "log": {"every": 2},
    "eval": {"val_batches": 2},
}
SWEEP_SHAPES = [{"name": "small", "model.d_model": 16}, {"name": "large", "model.d_model": 48, "model.n_layers": 2}]


def write_sweep(tmp_path: Path, data=None, **spec) -> Path:
    """An isoFLOP sweep file (budgets 1e9 and 3e9, `SWEEP_SHAPES`) over `SWEEP_BASE` in `tmp_path`,
    with the keys of `spec` replaced (None leaves a key out); `data` (train_dir, val_dir) if given."""
    base = json.loads(json.dumps(SWEEP_BASE))
    if data:
        base["data"].update(path=str(data[0]), val_path=str(data[1]))
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {"name": "t", "kind": "isoflop", "base": "base.yaml", "out": str(tmp_path / "sweep"),
            "budgets": [1e9, 3e9], "shapes": SWEEP_SHAPES, "warmup_fraction": 0.1, **spec}
    spec = {k: v for k, v in spec.items() if v is not None}  # None: leave the key out
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run_main(capsys, *args) -> tuple[int, str, str]:
    """`bigtrain ARGS` in this process: (exit code, stdout, stderr)."""
    from bigtrain.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def read_metrics(run_dir) -> list[dict]:
    """Every record of a run's metrics.jsonl."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """A command that failed with one `bigtrain: error:` line holding every fragment, no traceback."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bigtrain: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def random_hf_llama(path, tie=False, **extra):
    """A randomly initialised LlamaForCausalLM with grouped-query attention, saved by transformers."""
    import transformers

    torch.manual_seed(3)
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=50000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=tie, **extra)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    return model


# inputs for `prepare`: a text file, JSON lines (two empty documents), many short documents, and a
# JSONL file with bad lines among good ones
JSONL_TEXTS = ["first line doc", "", "second\nmultiline doc é", "third ✓", ""]
TXT_TEXT = "a whole text file\nis one document.\n" * 5
DOCS = [f"document {i}: " + "lorem ipsum dolor sit amet " * (i % 9 + 1) for i in range(120)]
BAD_JSONL = b'{"text": "good one"}\n{"text": "cut off\n[1, 2]\n{"body": "no text"}\n{"text": "good two"}\n'


def raw_corpus(tmp_path: Path) -> tuple[Path, Path, TextTokenizer]:
    """Inputs in sorted order: a.txt, empty.txt, sub/b.jsonl (2 empty docs + 1 blank line)."""
    root = tmp_path / "raw"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text(TXT_TEXT)
    (root / "empty.txt").write_text("")
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(JSONL_TEXTS)]
    (root / "sub" / "b.jsonl").write_text("\n".join(lines[:2] + [""] + lines[2:]) + "\n")
    (root / "ignored.csv").write_text("not,an,input\n")
    tok = TextTokenizer.train([TXT_TEXT, *JSONL_TEXTS, *DOCS], vocab_size=300)
    tok.save(tmp_path / "tok.json")
    return root, tmp_path / "tok.json", tok


def curve(run_dir) -> tuple[list[float], list[float], list[float]]:
    """Per-step training losses and gradient norms, and the validation losses (before and after)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    return [r["loss"] for r in steps], [r["grad_norm"] for r in steps], [r["val_loss"] for r in records if "val_loss" in r]


def muon_reference_step(w, g, m, lr, wd, beta=0.95):
    """Keller Jordan's Muon with Moonlight's RMS matching, written out for one matrix: the new
    weight and momentum after gradient `g` (momentum `m` before it)."""
    m = beta * m + (1 - beta) * g
    u = (1 - beta) * g + beta * m  # Nesterov
    a, b, c = 3.4445, -4.7750, 2.0315
    x = u.T if u.shape[0] > u.shape[1] else u
    x = x / (x.norm() + 1e-7)
    for _ in range(5):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    o = x.T if u.shape[0] > u.shape[1] else x
    return w * (1 - lr * wd) - lr * 0.2 * math.sqrt(max(w.shape)) * o, m
