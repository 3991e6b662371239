"""What crc32c checksums add to saving and resuming a checkpoint of the 125m shape (local engine,
fp32 weights and AdamW moments: ~1.3 GB), in one process: save (which checksums every file) vs the
checksum part alone, and a resume's file check with `checkpoint.verify` on vs off (sizes only).

    python tools/bench/bench_checkpoint.py [--config configs/125m.yaml] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from statistics import median

from common import engine_with_optimizer_state, record

from bigtrain.checkpoint import files as checkpoint_files
from bigtrain.checkpoint import io as ckpt
from bigtrain.distributed.communicator import LoneProcess


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/125m.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg, engine = engine_with_optimizer_state(args.config)
    saves, checksums, checked, unchecked = [], [], [], []
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        for i in range(args.repeats):
            run_dir = Path(tmp) / f"run{i}"
            started = time.perf_counter()
            path = ckpt.save_checkpoint(run_dir, 1, engine, LoneProcess(), {"tokens": 0}, cfg, None)
            saves.append(time.perf_counter() - started)
            started = time.perf_counter()
            checkpoint_files.write_file_list(path)  # the checksum pass a save makes, alone
            checksums.append(time.perf_counter() - started)
            for verify, times in ((True, checked), (False, unchecked)):
                started = time.perf_counter()
                assert checkpoint_files.file_problem(path, checksums=verify) is None
                times.append(time.perf_counter() - started)
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            shutil.rmtree(run_dir)
    save, crc, verify, sizes_only = map(median, (saves, checksums, checked, unchecked))
    record("checkpoint", {"config": args.config, "checkpoint_gb": round(size / 2**30, 2), "save_s": round(save, 2),
                          "checksum_s": round(crc, 2), "checksum_share_of_save": round(crc / save, 3),
                          "verify_s": round(verify, 2), "sizes_only_s": round(sizes_only, 4),
                          "crc32c_gb_per_s": round(size / 2**30 / crc, 2)})


if __name__ == "__main__":
    main()
