"""The whole benchmark suite in one command, ending with one table of ratios against goals.

    python tools/bench/run_all.py [--quick] [--out results.jsonl]

Runs, each in its own process: the training step (10m and 50m shapes: the local engine eager and
with `train.compile=true`, and DeepSpeed ZeRO-1 at world size 1, against HF `LlamaForCausalLM`),
`prepare` vs HF `datasets`, the loader vs `StreamingDataset`, and, when a CUDA GPU is visible,
the GPU step benchmark (MFU of 125m/350m/1b); without one, the table says that none was measured.
`--quick` shrinks every benchmark to a smoke run of a few minutes (its ratios are rough).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from common import load_average, machine, measure

HERE = Path(__file__).resolve().parent
STEP_SIDES = ["hf", "bigtrain", "bigtrain,train.compile=true", "deepspeed"]


def bench(script: str, *args: str) -> list[dict]:
    """Run one benchmark script; return the JSON records it printed."""
    out = measure([sys.executable, str(HERE / script), *args]).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith('{"bench"')]


def fmt(value: float, unit: str = "") -> str:
    return f"{value:,.0f}{unit}" if value >= 100 else f"{value:.3g}{unit}"


def step_rows(r: dict) -> list[list[str]]:
    sides, name = r["sides"], f"step {r['model']} (CPU, seq {r['seq_len']}, batch {r['micro_batch']})"

    def ratio(a: str, b: str) -> tuple[float, str]:
        wall = sides[a]["tokens_per_s"] / sides[b]["tokens_per_s"]
        cpu = sides[a]["tokens_per_cpu_s"] / sides[b]["tokens_per_cpu_s"]
        return cpu, f"{wall:.2f}× / **{cpu:.2f}×**"

    def tok(side: str) -> str:
        return f"{fmt(sides[side]['tokens_per_s'])} tok/s ({fmt(sides[side]['tokens_per_cpu_s'])} per CPU-s)"

    rows = []  # a record may hold only some of the sides (`bench_step.py --sides ...`)
    for side, label in (("bigtrain", "local engine"), ("bigtrain,train.compile=true", "local + train.compile")):
        if side in sides and "hf" in sides:
            cpu, text = ratio(side, "hf")
            rows.append([f"{name}: {label} vs HF", tok(side), tok("hf"), text, "≥ 1.1× (floor 1.0×)",
                         "yes" if cpu >= 1.1 else ("floor" if cpu >= 1.0 else "no")])
    if "deepspeed" in sides and "bigtrain" in sides:
        cpu, text = ratio("deepspeed", "bigtrain")
        rows.append([f"{name}: DeepSpeed ZeRO-1 (1 rank) vs local", tok("deepspeed"), tok("bigtrain"), text,
                     "≥ 0.9×", "yes" if cpu >= 0.9 else "no"])
    return rows


def prepare_row(r: dict) -> list[str]:
    return [f"prepare {r['input_mb']} MB, {r['workers']} workers vs `datasets.map`",
            f"{r['bigtrain_mb_per_s']} MB/s, peak RSS {r['bigtrain_peak_rss_mb']} MB",
            f"peak RSS {r['hf_peak_rss_mb']} MB", f"{r['speedup_wall']}× / **{r['speedup_cpu']}×**", "≥ 1.5×",
            "yes" if r["speedup_cpu"] >= 1.5 else "no"]


def loader_rows(r: dict) -> list[list[str]]:
    return [
        [f"loader [{r['micro_batch']}, {r['seq_len'] + 1}] windows vs `StreamingDataset`",
         f"{fmt(r['bigtrain_windows_per_s'])} windows/s", f"{fmt(r['streaming_windows_per_s'])} windows/s",
         f"**{r['speedup']}×**", "≥ 2×", "yes" if r["speedup"] >= 2 else "no"],
        ["loader tokens/s vs 125m on one H100 at 50 % MFU", f"{fmt(r['bigtrain_tokens_per_s'])} tok/s",
         f"{fmt(r['h100_125m_tokens_per_s_at_50pct_mfu'])} tok/s", f"**{r['headroom']}×**", "≥ 100×",
         "yes" if r["headroom"] >= 100 else "no"],
    ]


def gpu_rows(r: dict) -> list[list[str]]:
    """`bench_gpu.py`'s and `bench_step.py --device cuda`'s records: one row per side; a side that
    failed or was skipped says so."""
    goal = {"125m": 0.40, "1b": 0.55}.get(r["model"])
    hf = r["sides"].get("hf", {})
    rows = []
    for side, v in r["sides"].items():
        name = f"GPU {r['model']} bf16 ({r.get('device', 'cuda')}): {side}"
        if "tokens_per_s" not in v:
            rows.append([name, v.get("error") or v.get("skipped") or "no result", "", "", "", "no"])
            continue
        mfu = v.get("mfu")
        ok = "" if goal is None or mfu is None or "precision=fp8" in side else ("yes" if mfu >= goal else "no")
        vs_hf = v.get("vs_hf") or (round(v["tokens_per_s"] / hf["tokens_per_s"], 3) if "tokens_per_s" in hf else "")
        rows.append([name, f"{fmt(v['tokens_per_s'])} tok/s, MFU {100 * (mfu or 0):.1f} % (of the bf16 peak), "
                           f"{v.get('peak_mem_gib')} GiB",
                     f"HF {fmt(hf['tokens_per_s'])} tok/s" if "tokens_per_s" in hf else "", f"{vs_hf}×" if vs_hf else "",
                     f"MFU ≥ {100 * goal:.0f} %, ≥ 1.3× HF" if goal else "≥ 1.3× HF", ok])
    return rows


def device_check_rows(r: dict) -> list[list[str]]:
    """`device_check.py`'s records: its step sides as GPU rows (HF's, when it ran, as their
    reference), the kernel table and the bf16-vs-fp32 curve as rows of their own."""
    if "skipped" in r or "error" in r:
        return [[f"GPU device check: {r['side']}", r.get("skipped") or r["error"], "", "", "", "" if "skipped" in r else "no"]]
    rows = []
    for inner in r.get("records", []):
        if inner["bench"] == "step":
            rows += gpu_rows(inner)
        elif inner["bench"] == "kernels":
            clean = not inner["fp32_gemm_kernels"]
            rows.append([f"GPU kernels {Path(inner['config']).stem} ({inner['device']})",
                         f"attention: {', '.join(inner['attention_kernels'])[:80] or 'none found'}",
                         f"GEMMs {100 * inner['gemm_time_share']:.0f} % of kernel time", "",
                         "no fp32 GEMM", "yes" if clean else f"no: {len(inner['fp32_gemm_kernels'])} fp32 GEMM(s)"])
    if "bf16_vs_fp32" in r:
        rows.append(["GPU loss curve 125m, 50 steps: bf16 vs fp32", f"{r['bf16_tail_loss']}", f"{r['fp32_tail_loss']}",
                     f"{100 * r['bf16_vs_fp32']:+.2f} %", "within 2 %", "yes" if r["within_goal"] else "no"])
    return rows


def rows_of(records: list[dict]) -> list[list[str]]:
    """The table rows of a run's records, in the order the suite runs them; records of kinds the
    table does not show (versions, curves, MoE, masking) are left out."""
    makers = {"step": step_rows, "prepare": lambda r: [prepare_row(r)], "loader": loader_rows, "gpu": gpu_rows,
              "device-check": device_check_rows}
    rows = []
    for r in records:
        if r["bench"] == "step" and r.get("device", "cpu") != "cpu":
            rows += gpu_rows(r)
        elif r["bench"] in makers:
            rows += makers[r["bench"]](r)
    if not any(r["bench"] in ("gpu", "device-check") for r in records):
        rows.append(["GPU: MFU of 125m / 350m / 1b, local and ZeRO-1 vs HF", "not measured: no GPU here", "", "", "", ""])
    return rows


def run_suite(quick: bool, threads: str, repeats: int | None, keep) -> None:
    """Run every benchmark, handing each record to `keep` as soon as it exists."""
    steps = ["--steps", "1", "--warmup", "1"] if quick else ["--steps", "2"]
    steps += ["--repeats", str(repeats or (2 if quick else 5))]
    for size, micro_batch in (("10m", "8"), ("50m", "4")):
        keep(bench("bench_step.py", "--size", size, "--micro-batch", micro_batch, "--threads", threads,
                   "--sides", *STEP_SIDES, *steps))
    data_mb = ("16", "16") if quick else ("128", "64")
    keep(bench("bench_prepare.py", "--mb", data_mb[0], "--workers", "2", "--repeat", "1" if quick else "3"))
    keep(bench("bench_loader.py", "--mb", data_mb[1]))
    if torch.cuda.is_available():
        keep(bench("bench_gpu.py", *(["--models", "125m", "--steps", "3", "--repeats", "1"] if quick else [])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few minutes")
    parser.add_argument("--threads", default="1",
                        help="torch threads of the step benchmark (1: CPU-time ratios stay honest on a busy machine)")
    parser.add_argument("--repeats", type=int, help="rounds of the step benchmark (default 5; 2 with --quick)")
    parser.add_argument("--out", type=Path, help="append every JSON record to this file as it is measured")
    parser.add_argument("--table", type=Path, metavar="RECORDS", help="only print the table of a saved --out file")
    args = parser.parse_args()

    load = [load_average()]
    if args.table:
        records = [json.loads(line) for line in args.table.read_text().splitlines() if line.strip()]
    else:
        records = []

        def keep(new: list[dict]) -> None:
            records.extend(new)
            if args.out:
                with open(args.out, "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in new)

        run_suite(args.quick, args.threads, args.repeats, keep)
        load.append(load_average())
        print(f"\n{machine()}; torch {torch.__version__}; load average {load[0]} → {load[-1]}")
    print("ratios: wall-time / **CPU-time** (the CPU-time ratio is the robust one on a shared machine)\n")
    print("| benchmark | bigtrain | reference | ratio | goal | met |")
    print("|---|---|---|---|---|---|")
    for row in rows_of(records):
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
