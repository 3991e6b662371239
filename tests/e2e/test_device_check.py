"""The GPU check, without a GPU: its dry run lists the sides in order of value within a short
slot; the runner records each side's result, stderr, timeouts and compile problems as they end;
the benchmark table takes GPU records, failed sides included."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[2] / "tools" / "bench"
sys.path.insert(0, str(BENCH))

import device_check  # noqa: E402
import run_all  # noqa: E402
from kernel_table import classify  # noqa: E402


def test_dry_run_lists_the_sides_in_order_of_value():
    out = subprocess.run([sys.executable, str(BENCH / "device_check.py"), "--dry-run"], capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert [line.split()[0] for line in out[:-1]] == [
        "bigtrain-1b-compiled", "hf-1b", "bigtrain-125m-compiled", "kernels-125m-compiled",
        "master-weights-1b-compiled", "deepspeed-zero1-1b-compiled", "fp8-1b-compiled", "curve-125m-bf16",
        "curve-125m-fp32"]
    assert out[-1].split()[:3] == ["total", str(sum(s.budget_s for s in device_check.SIDES)), "s"]
    assert all("--grad-accum" not in s.args or s.args[s.args.index("--grad-accum") + 1] in ("2", "4")
               for s in device_check.SIDES)  # 64k tokens a step


def test_a_side_records_its_result_stderr_compile_problems_and_timeout(tmp_path):
    script = tmp_path / "side.py"
    script.write_text("import json, sys, time\nprint(json.dumps({'bench': 'step', 'x': 1}))\n"
                      "print('Graph break in user code', file=sys.stderr)\ntime.sleep(float(sys.argv[1]))\n")
    device = {"device": "cpu", "torch": "2", "transformers": "5", "deepspeed": None, "cuda": None, "cudnn": None}
    compiled = device_check.Side("compiled", 30, [str(script), "0", "train.compile=true"])
    result = device_check.run(compiled, 30, tmp_path, device)
    assert result["records"] == [{"bench": "step", "x": 1}] and result["device"] == "cpu"
    assert "1 recompilation(s) or graph break(s)" in result["error"]
    slow = device_check.run(device_check.Side("slow", 1, [str(script), "30"]), 1, tmp_path, device)
    assert slow["error"] == "timed out after 1 s" and slow["records"] == [{"bench": "step", "x": 1}]
    log = (tmp_path / "stderr.log").read_text()
    assert "===== compiled (exit 0" in log and "===== slow (exit None" in log and "Graph break" in log


def test_kernel_names_are_classified():
    found = classify({"sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n": 50.0, "ampere_sgemm_128x64_nn": 10.0,
                      "pytorch_flash::flash_fwd_kernel": 30.0, "triton_poi_fused_add_0": 10.0})
    assert found["attention_kernels"] == ["pytorch_flash::flash_fwd_kernel"]
    assert found["fp32_gemm_kernels"] == ["ampere_sgemm_128x64_nn"]
    assert found["gemm_time_share"] == 0.6


def test_the_table_takes_gpu_records_and_failed_sides():
    step = {"bench": "step", "model": "1b", "device": "NVIDIA H200", "seq_len": 4096, "micro_batch": 4,
            "sides": {"bigtrain,train.compile=true": {"tokens_per_s": 50_000, "mfu": 0.5, "peak_mem_gib": 40}}}
    records = [
        {"bench": "device-check-versions", "torch": "2.11"},
        {"bench": "device-check", "side": "bigtrain-1b-compiled", "device": "NVIDIA H200", "records": [step]},
        {"bench": "device-check", "side": "fp8-1b-compiled", "device": "NVIDIA H200", "records": [],
         "error": "timed out after 100 s"},
        {"bench": "device-check", "side": "curve-125m-fp32", "skipped": "40 s left of the budget"},
        {"bench": "device-check", "side": "curve-125m-bf16-vs-fp32", "bf16_tail_loss": 5.0, "fp32_tail_loss": 4.95,
         "bf16_vs_fp32": 0.0101, "within_goal": True},
        {"bench": "gpu", "model": "125m", "sides": {"hf": {"error": "CUDA out of memory"}}},
    ]
    rows = run_all.rows_of(json.loads(json.dumps(records)))
    text = "\n".join(" | ".join(row) for row in rows)
    assert "GPU 1b bf16 (NVIDIA H200): bigtrain,train.compile=true | 50,000 tok/s, MFU 50.0 %" in text
    assert "fp8-1b-compiled | timed out after 100 s" in text and "40 s left of the budget" in text
    assert "bf16 vs fp32 | 5.0 | 4.95 | +1.01 %" in text and "CUDA out of memory" in text
    assert "not measured: no GPU here" not in text
