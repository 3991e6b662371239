"""How long the training loop waits for a checkpoint of the 125m shape (local engine, fp32
weights and AdamW moments: ~1.3 GB), synchronous vs `checkpoint.async`, in one process, turns
alternating: the stall (`checkpoint_stall_s`: the whole save, or the copy into host memory) and
the time until the checkpoint is complete (`checkpoint_write_s`). The first asynchronous save also
allocates the staging buffers; the others reuse them (reported apart).

    python tools/bench/bench_async_checkpoint.py [--config configs/125m.yaml] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from statistics import median

from common import engine_with_optimizer_state, record

from bigtrain.checkpoint import io as ckpt
from bigtrain.checkpoint.writes import Direct, Staged
from bigtrain.distributed.communicator import LoneProcess


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/125m.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg, engine = engine_with_optimizer_state(args.config)
    comm, staged = LoneProcess(), Staged()
    stalls: dict[str, list[float]] = {"sync": [], "async": []}
    writes: dict[str, list[float]] = {"sync": [], "async": []}
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        for i in range(args.repeats + 1):  # round 0 allocates the staging buffers
            for mode in ("sync", "async") if i % 2 else ("async", "sync"):
                run_dir = Path(tmp) / f"{mode}{i}"
                if mode == "async":
                    staged.begin()
                save = ckpt.begin_save(run_dir, 1, engine, comm, {"tokens": 0}, cfg, None, None,
                                       staged if mode == "async" else Direct())
                if mode == "sync":
                    save.write_together(comm)
                else:
                    staged.staged()
                    save.write_in_background()
                stall = time.perf_counter() - save.began
                path = save.finish(comm)
                stalls[mode].append(stall)
                writes[mode].append(time.perf_counter() - save.began)
                size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
                shutil.rmtree(run_dir)
    sync_stall, async_stall = median(stalls["sync"][1:]), median(stalls["async"][1:])
    record("async_checkpoint", {
        "config": args.config, "checkpoint_gb": round(size / 2**30, 2), "staging_gb": round(staged.bytes() / 2**30, 2),
        "sync_stall_s": round(sync_stall, 3), "async_stall_s": round(async_stall, 3),
        "async_first_stall_s": round(stalls["async"][0], 3),
        "sync_write_s": round(median(writes["sync"][1:]), 3), "async_write_s": round(median(writes["async"][1:]), 3),
        "stall_ratio": round(async_stall / sync_stall, 3),
    })


if __name__ == "__main__":
    main()
