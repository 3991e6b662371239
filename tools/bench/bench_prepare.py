"""prepare throughput and peak memory vs HF `datasets` (`load_dataset` + `map(batched=True,
num_proc=N)` + `save_to_disk`), same tokenizer, same corpus, measured in one run.

    python tools/bench/bench_prepare.py --mb 1024 --workers 2 [--repeat 3]

The corpus is the stdlib corpus repeated to `--mb` MB in a temporary directory (deleted after).
The two pipelines alternate `--repeat` times; the speedups are ratios of the medians, of wall
time and of CPU time (the latter holds even while other jobs compete for the machine).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import textwrap
from statistics import median

from common import corpus_arguments, corpus_workspace, load_average, measure, record

HF_PIPELINE = textwrap.dedent("""
    import json, sys, time
    import datasets
    import pyarrow.compute as pc
    from tokenizers import Tokenizer
    corpus, tokenizer_path, out, cache, num_proc = sys.argv[1:6]
    datasets.disable_progress_bars()
    tokenizer = Tokenizer.from_file(tokenizer_path)
    eos = tokenizer.token_to_id("<|endoftext|>")

    def tokenize(batch):
        encoded = tokenizer.encode_batch(batch["text"], add_special_tokens=False)
        return {"input_ids": [e.ids + [eos] for e in encoded]}

    t0 = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=corpus, split="train", cache_dir=cache)
    t1 = time.perf_counter()
    ds = ds.map(tokenize, batched=True, num_proc=int(num_proc), remove_columns=ds.column_names)
    t2 = time.perf_counter()
    ds.save_to_disk(out)
    t3 = time.perf_counter()
    tokens = pc.sum(pc.list_value_length(ds.data.column("input_ids"))).as_py()
    print(json.dumps({"load_s": t1 - t0, "map_s": t2 - t1, "save_s": t3 - t2, "tokens": tokens}))
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    corpus_arguments(parser, megabytes=1024)
    parser.add_argument("--workers", type=int, default=2, help="our --workers and HF's num_proc")
    parser.add_argument("--repeat", type=int, default=1, help="alternate the two pipelines N times")
    args = parser.parse_args()

    with corpus_workspace(args, "prepare") as (root, corpus, tokenizer):
        size_mb = corpus.stat().st_size / 1e6
        load = [load_average()]
        ours, theirs = [], []
        for i in range(args.repeat):
            out, hf = root / f"ours-{i}", root / f"hf-{i}"
            ours.append(measure([sys.executable, "-m", "bigtrain", "prepare", "--input", str(corpus),
                                 "--tokenizer", str(tokenizer), "--out", str(out),
                                 "--workers", str(args.workers)]))
            manifest = json.loads((out / "manifest.json").read_text())
            output_mb = sum(s["bytes"] for s in manifest["shards"]) / 1e6
            shutil.rmtree(out)
            theirs.append(measure([sys.executable, "-c", HF_PIPELINE, str(corpus), str(tokenizer),
                                   str(hf), str(root / f"hf-cache-{i}"), str(args.workers)]))
            hf_output_mb = sum(f.stat().st_size for f in hf.rglob("*")) / 1e6
            shutil.rmtree(hf)
            shutil.rmtree(root / f"hf-cache-{i}")
            load.append(load_average())
        phases = json.loads(theirs[-1].stdout)
        totals = manifest["totals"]  # HF keeps empty documents as a lone EOS; we skip them
        assert phases["tokens"] == totals["tokens"] + totals["empty_documents_skipped"]

    wall = median(m.wall_s for m in ours), median(m.wall_s for m in theirs)
    cpu = median(m.cpu_s for m in ours), median(m.cpu_s for m in theirs)
    record("prepare", {
        "input_mb": round(size_mb, 1),
        "tokens": totals["tokens"],
        "vocab_size": args.vocab_size,
        "workers": args.workers,
        "repeats": args.repeat,
        "load_average_1m": load,
        "bigtrain_wall_s": [round(m.wall_s, 1) for m in ours],
        "bigtrain_cpu_s": [round(m.cpu_s, 1) for m in ours],
        "bigtrain_mb_per_s": round(size_mb / wall[0], 2),
        "bigtrain_peak_rss_mb": round(max(m.peak_rss_mb for m in ours)),
        "bigtrain_output_mb": round(output_mb, 1),
        "hf_wall_s": [round(m.wall_s, 1) for m in theirs],
        "hf_cpu_s": [round(m.cpu_s, 1) for m in theirs],
        "hf_last_phases_s": {k: round(v, 1) for k, v in phases.items() if k.endswith("_s")},
        "hf_peak_rss_mb": round(max(m.peak_rss_mb for m in theirs)),
        "hf_output_mb": round(hf_output_mb, 1),
        "speedup_wall": round(wall[1] / wall[0], 2),
        "speedup_cpu": round(cpu[1] / cpu[0], 2),
    })


if __name__ == "__main__":
    main()
