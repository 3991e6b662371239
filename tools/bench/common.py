"""Shared pieces of the benchmarks: a corpus of a given size and its tokenizer in a temporary
workspace, a runner that times a command and samples the peak resident memory of its whole process
tree, and the JSON record every benchmark prints.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import psutil

from bigtrain.data.corpus import write_default_corpus
from bigtrain.data.prepare import iter_documents
from bigtrain.data.tokenizer import TextTokenizer


def make_corpus(root: Path, megabytes: float) -> Path:
    """`root/corpus.jsonl`: the stdlib corpus repeated (whole lines) to about `megabytes` MB."""
    source, _ = write_default_corpus(root / "stdlib", val_fraction=0.0)
    block = source.read_bytes()
    target = int(megabytes * 1e6)
    out = root / "corpus.jsonl"
    with open(out, "wb") as f:
        written = 0
        while written < target:
            piece = block[: target - written]
            piece = piece[: piece.rfind(b"\n") + 1]
            if not piece:
                break
            f.write(piece)
            written += len(piece)
    return out


def make_tokenizer(root: Path, corpus: Path, vocab_size: int, train_mb: float = 8.0) -> Path:
    """A byte-level BPE trained on the first `train_mb` MB of the corpus."""
    path = root / f"tokenizer-{vocab_size}.json"
    if not path.exists():
        def head():
            budget = train_mb * 1e6
            for text in iter_documents([corpus]):
                budget -= len(text)
                if budget < 0:
                    return
                yield text

        TextTokenizer.train(head(), vocab_size).save(path)
    return path


def corpus_arguments(parser: argparse.ArgumentParser, megabytes: float) -> None:
    """The options of a benchmark that runs on a generated corpus."""
    parser.add_argument("--mb", type=float, default=megabytes, help="corpus size in MB")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--tmp", default=None, help="directory for the temporary files")


@contextmanager
def corpus_workspace(args: argparse.Namespace, name: str) -> Iterator[tuple[Path, Path, Path]]:
    """(directory, corpus, tokenizer): a temporary directory holding the corpus of `args.mb` MB
    and its tokenizer, deleted afterwards."""
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix=f"bench-{name}-") as tmp:
        root = Path(tmp)
        corpus = make_corpus(root, args.mb)
        yield root, corpus, make_tokenizer(root, corpus, args.vocab_size)


@dataclass
class Measured:
    wall_s: float
    cpu_s: float  # user + system time of the command and every child it waited for
    peak_rss_mb: float
    stdout: str
    stderr: str = ""


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(cmd: list[str], env: dict | None = None) -> Measured:
    """Run `cmd`, returning its wall and CPU time and the peak summed RSS of its process tree."""
    cpu = _children_cpu_s()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    watched, peak, done = psutil.Process(proc.pid), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                peak[0] = max(peak[0], _tree_rss(watched))
            except psutil.NoSuchProcess:
                return
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err}")
    return Measured(wall, _children_cpu_s() - cpu, peak[0] / 2**20, out, err)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    memory = psutil.virtual_memory().total / 2**30
    return f"{platform.node()}: {os.cpu_count()} CPUs ({cpu}), {memory:.0f} GiB, Linux {platform.release()}"


def load_average() -> float:
    """The 1-minute load average: other work competing for the CPUs while we measure."""
    return round(os.getloadavg()[0], 2)


def record(name: str, values: dict) -> None:
    """Print the results as one JSON line (for the table in tools/bench/README.md)."""
    print(json.dumps({"bench": name, "date": date.today().isoformat(), "machine": machine(),
                      "python": sys.version.split()[0], **values}))


def engine_with_optimizer_state(config: str):
    """(config, local engine on CPU in fp32) of `config`, after one zero-gradient AdamW update so
    that the optimizer state a trained run's checkpoint holds exists."""
    import torch

    from bigtrain.config import load_config
    from bigtrain.engine.local import local_engine
    from bigtrain.model import Llama

    cfg = load_config(config, ["train.device=cpu", "train.precision=fp32"])
    engine = local_engine(Llama(cfg.model), cfg.train)
    for p in engine.model.parameters():
        p.grad = torch.zeros_like(p)
    engine.optimizer.step()
    return cfg, engine
