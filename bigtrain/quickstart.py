"""`bigtrain quickstart`: embedded corpus → tokenizer → shards → train `tiny` → eval → samples.

Training evaluates the shipped lm-eval task `python_next_line` before the first step and at the end.

Needs no downloads: the corpus is the Python standard library's own source code. The number of
training steps is chosen by timing a few steps first, so training fits the `minutes` budget.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bigtrain.checkpoint.io import load_trained_model
from bigtrain.config import Config, TrainConfig
from bigtrain.data.corpus import write_default_corpus
from bigtrain.data.prepare import iter_documents, prepare
from bigtrain.data.shards import MANIFEST
from bigtrain.data.tokenizer import TextTokenizer
from bigtrain.engine.device import pick_device
from bigtrain.engine.local import local_engine
from bigtrain.errors import BigtrainError
from bigtrain.eval.generate import generate
from bigtrain.model import Llama
from bigtrain.train.loop import TrainResult, set_determinism, train

PROMPTS = ["def ", "import os\n", "class Request:\n    def __init__(self"]
TASK, TASK_LIMIT = "python_next_line", 200  # the shipped lm-eval task, evaluated before and after training


@dataclass
class QuickstartResult:
    train: TrainResult
    samples: dict[str, str]
    accuracy: list[float]  # TASK's accuracy at each evaluation (before training, at the end)


def prepare_default_data(data_dir: Path, vocab_size: int, corpus_mb: float | None) -> tuple[Path, Path]:
    """Build (or reuse) the corpus, tokenizer and train/val shards under `data_dir`."""
    print(f"[1/4] corpus: Python standard library sources → {data_dir / 'corpus'}")
    train_jsonl, val_jsonl = write_default_corpus(data_dir / "corpus", max_mb=corpus_mb)
    tokenizer_path = data_dir / "tokenizer.json"
    if not tokenizer_path.exists():
        print(f"[2/4] tokenizer: byte-level BPE, vocab {vocab_size} → {tokenizer_path}")
        TextTokenizer.train(iter_documents([train_jsonl]), vocab_size).save(tokenizer_path)
    splits = {"train": train_jsonl, "val": val_jsonl}
    for name, source in splits.items():
        if not (data_dir / name / MANIFEST).exists():
            print(f"[3/4] prepare: tokenizing {name} split → {data_dir / name}")
            prepare([source], tokenizer_path, data_dir / name)
    return data_dir / "train", data_dir / "val"


def seconds_per_step(cfg: Config, warmup: int = 2, timed: int = 3) -> float:
    """Time optimiser steps of the configured model on random tokens, after a warm-up."""
    set_determinism(0, cfg.train)
    engine = local_engine(Llama(cfg.model), TrainConfig(device=cfg.train.device))
    batch = torch.randint(0, cfg.model.vocab_size, (cfg.data.micro_batch, cfg.data.seq_len + 1))
    for _ in range(warmup):
        engine.train_step([batch] * cfg.train.grad_accum, 1e-4)
    start = time.perf_counter()
    for _ in range(timed):
        engine.train_step([batch] * cfg.train.grad_accum, 1e-4).loss.item()
    return (time.perf_counter() - start) / timed


def quickstart(out: Path, minutes: float = 5.0, corpus_mb: float | None = None,
               steps: int | None = None) -> QuickstartResult:
    """Prepare the embedded corpus and train the tiny model for `minutes` (or exactly `steps`)."""
    if minutes <= 0 or (steps is not None and steps <= 0):
        raise BigtrainError("--minutes and --steps must be positive")
    run_dir = out / "run"
    if (run_dir / "checkpoints").exists():
        raise BigtrainError(f"{run_dir} already holds a quickstart run; pass --out to choose a new directory")
    cfg = Config()  # the tiny config
    cfg.data.path, cfg.data.val_path = map(str, prepare_default_data(out / "data", cfg.model.vocab_size, corpus_mb))
    cfg.run.name, cfg.run.dir = "quickstart", str(run_dir)

    if steps is None:
        step_s = seconds_per_step(cfg)
        eval_share = 0.15  # rough share of the budget left for validation passes and checkpoints
        steps = max(10, int(minutes * 60 * (1 - eval_share) / step_s))
        cfg.train.max_minutes = minutes
        plan = f"{steps} steps of ~{step_s:.2f}s to fit {minutes:g} min"
    else:
        plan = f"{steps} steps"
    cfg.train.steps = steps
    cfg.train.warmup_steps = max(1, min(cfg.train.warmup_steps, steps // 10))
    cfg.eval.val_every, cfg.eval.val_batches = max(1, steps // 4), 8
    cfg.checkpoint.every, cfg.log.every = steps, max(1, min(10, steps // 50))
    cfg.eval.tasks, cfg.eval.every, cfg.eval.limit = [TASK], steps, TASK_LIMIT
    cfg.validate()
    print(f"[4/4] train: {plan} → {run_dir}")
    result = train(cfg)

    tokenizer = TextTokenizer.load(Path(cfg.data.path) / "tokenizer.json")
    model, _, _ = load_trained_model(result.checkpoint, pick_device(cfg.train.device))
    generator = torch.Generator().manual_seed(cfg.run.seed)
    samples = {}
    for prompt in PROMPTS:
        ids = generate(model, tokenizer.encode(prompt), 48, cfg.model.max_seq_len, tokenizer.eos_id,
                       temperature=0.8, top_k=50, generator=generator)
        samples[prompt] = prompt + tokenizer.decode(ids)
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    accuracy = [r[f"eval/{TASK}/acc"] for r in records if f"eval/{TASK}/acc" in r]
    return QuickstartResult(train=result, samples=samples, accuracy=accuracy)


def summary(result: QuickstartResult) -> str:
    """What the user should look at: losses before/after, samples, and where the files are."""
    t = result.train
    lines = ["", f"trained {t.step} steps ({t.tokens:,} tokens) in {t.wall_s / 60:.1f} min"]
    if t.first_val and t.val:
        lines.append(
            f"validation loss {t.first_val.loss:.3f} → {t.val.loss:.3f}   "
            f"perplexity {t.first_val.perplexity:.1f} → {t.val.perplexity:.1f}"
        )
    if result.accuracy:
        lines.append(f"{TASK} accuracy {result.accuracy[0]:.3f} → {result.accuracy[-1]:.3f} "
                     f"(lm-eval, first {TASK_LIMIT} documents; chance 0.250)")
    lines.append("samples (temperature 0.8, top-k 50):")
    for text in result.samples.values():
        lines.append("  ┆ " + text.replace("\n", "\n  ┆ "))
    lines += [
        f"run directory  {t.run_dir}",
        f"checkpoint     {t.checkpoint}",
        f"metrics        {t.run_dir / 'metrics.jsonl'}",
        f"next: bigtrain generate {t.checkpoint} --prompt 'def '",
        f"      bigtrain eval {t.checkpoint} --tasks {TASK}",
    ]
    return "\n".join(lines)
