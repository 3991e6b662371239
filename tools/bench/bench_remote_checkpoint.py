"""What `checkpoint.remote` costs the step loop, for the tiny model (local engine, fp32 weights and
AdamW moments), in one process against a live S3-protocol server (tools/s3_server.py, or the one
S3_ENDPOINT_URL names with --remote): the blocking local save, the background upload that follows
it, and how long the loop stands still with the upload in the background (save + starting the
thread) vs a blocking save + upload.

    python tools/bench/bench_remote_checkpoint.py [--config configs/tiny.yaml] [--repeats 3] [--remote s3://B/P]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import boto3
from common import engine_with_optimizer_state, record

from bigtrain.checkpoint import io as ckpt
from bigtrain.checkpoint.mirror import CheckpointMirror
from bigtrain.distributed.communicator import LoneProcess

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import s3_server  # noqa: E402  (tools/s3_server.py)


def measure(cfg, engine, tmp: Path, repeats: int) -> dict[str, float]:
    saves, stalls, uploads, blocking = [], [], [], []
    for i in range(repeats):
        for background in (True, False):  # interleaved, so both sides see the same neighbours
            run_dir = tmp / f"run-{i}-{background}"
            cfg.checkpoint.remote = f"{cfg.checkpoint.remote.rsplit('/', 1)[0]}/{run_dir.name}"
            mirror = CheckpointMirror(cfg.checkpoint)
            started = time.perf_counter()
            path = ckpt.save_checkpoint(run_dir, 1, engine, LoneProcess(), {"tokens": 0}, cfg, None)
            saved = time.perf_counter()
            mirror.upload(path, LoneProcess())
            if background:
                stalls.append(time.perf_counter() - started)
                saves.append(saved - started)
                uploads.append(mirror.wait(LoneProcess())["checkpoint_upload_s"])
            else:
                assert mirror.wait(LoneProcess()) is not None
                blocking.append(time.perf_counter() - started)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {"checkpoint_mb": round(size / 2**20, 1), "save_s": round(median(saves), 3),
            "upload_s": round(median(uploads), 3), "upload_vs_save": round(median(uploads) / median(saves), 2),
            "loop_stall_background_s": round(median(stalls), 3), "loop_stall_blocking_s": round(median(blocking), 3),
            "blocking_vs_background": round(median(blocking) / median(stalls), 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--remote", help="s3://BUCKET/PREFIX (default: a throw-away server of tools/s3_server.py)")
    args = parser.parse_args()
    cfg, engine = engine_with_optimizer_state(args.config)
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        server = Path(tmp) / "server"
        if args.remote is None:
            os.environ.update(s3_server.env(s3_server.start(server)))
            boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"]).create_bucket(Bucket="bench")
        cfg.checkpoint.remote = (args.remote or "s3://bench").rstrip("/") + "/x"
        try:
            result = measure(cfg, engine, Path(tmp), args.repeats)
        finally:
            s3_server.stop(server)
    record("remote_checkpoint", {"config": args.config, **result})


if __name__ == "__main__":
    main()
