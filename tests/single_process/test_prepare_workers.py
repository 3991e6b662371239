"""`prepare` with worker processes, driven from a fresh interpreter: a failing worker ends prepare
every time even on a busy machine, and a worker that dies is one error line and the rerun resumes."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import bigtrain.data.prepare as prepare_module
from bigtrain.data.prepare import prepare
from bigtrain.data.shards import verify_dataset
from tests.helpers import BAD_JSONL, DOCS, raw_corpus

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def corpus(tmp_path):
    return raw_corpus(tmp_path)


def _kill_group(pgid: int) -> None:
    """Kill the process group a `_python` driver leads (it and its workers), if any is left."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _python(code: str, *args: str, timeout: float, env: dict | None = None) -> str:
    """Run `code` in a fresh interpreter; its stdout. Past `timeout` seconds the test fails
    (with the output so far) and the interpreter and its worker processes are killed."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"still running after {timeout} s:\n{out[-2000:]}\n{err[-5000:]}")
    finally:
        _kill_group(proc.pid)  # worker processes left behind by a driver that died
    assert proc.returncode == 0, f"{out[-2000:]}\n{err[-5000:]}"
    return out


# Runs strict prepare with 2 workers again and again; one JSON line per run. faulthandler ends a
# run stuck for PER_RUN_S with every thread's stack on stderr, so a hang is a failure with a trace.
STRICT_RUNS = """
import faulthandler, json, sys, time
from pathlib import Path
import bigtrain.data.prepare as prepare_module
from bigtrain.errors import BigtrainError

root, runs, per_run_s = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
prepare_module.MIN_UNIT_BYTES = 10  # several units, so a pool runs them
for run in range(runs):
    faulthandler.dump_traceback_later(per_run_s, exit=True)
    start, error = time.monotonic(), None
    try:
        prepare_module.prepare([root / "more.jsonl", root / "bad.jsonl"], root / "tok.json",
                               root / f"out{run}", strict=True, workers=2)
    except BigtrainError as e:
        error = str(e)
    faulthandler.cancel_dump_traceback_later()
    print(json.dumps({"seconds": time.monotonic() - start, "error": error}), flush=True)
"""


@pytest.mark.slow
def test_a_failing_worker_ends_prepare_every_time_even_on_a_busy_machine(corpus, tmp_path):
    """50 strict failures from worker processes while another process keeps a core busy."""
    _, tok_path, _ = corpus
    (tmp_path / "bad.jsonl").write_bytes(BAD_JSONL)
    (tmp_path / "more.jsonl").write_text('{"text": "fine"}\n' * 3)
    (tmp_path / "tok.json").write_bytes(tok_path.read_bytes())
    runs, per_run_s = 50, 30
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        out = _python(STRICT_RUNS, str(tmp_path), str(runs), str(per_run_s), timeout=runs * per_run_s)
    finally:
        busy.kill()
        busy.wait()
    results = [json.loads(line) for line in out.splitlines()]
    assert len(results) == runs
    where = (tmp_path / "bad.jsonl").resolve()
    assert {r["error"] for r in results} == {f"{where}:2: not valid JSON (--strict)"}
    assert (tmp_path / "bad.jsonl").read_bytes() == BAD_JSONL
    assert not any((tmp_path / f"out{run}" / "manifest.json").exists() for run in range(runs))


# A worker that dies on unit 1 without raising (os._exit, or SIGKILL as the OOM killer sends),
# then the same prepare again with the real worker. Spawned workers import `dying` by name.
DYING_WORKER = """
import os, signal
from bigtrain.data.prepare import run_unit

def run_unit_or_die(job, progress=None):
    if job.index == 1:
        {death}
    return run_unit(job, progress)
"""
DIES_THEN_RESUMES = """
import faulthandler, json, sys
from pathlib import Path
import bigtrain.data.prepare as prepare_module
from bigtrain.errors import BigtrainError
import dying

src, tok, out = sys.argv[1:4]
prepare_module.MIN_UNIT_BYTES = 2000
faulthandler.dump_traceback_later(60, exit=True)
prepare_module.run_unit = dying.run_unit_or_die
try:
    prepare_module.prepare([src], tok, out, shard_tokens=300, workers=2)
    error = None
except BigtrainError as e:
    error = str(e)
state = sorted(p.name for p in (Path(out) / ".prepare").glob("unit-*.json"))
prepare_module.run_unit = dying.run_unit
manifest = prepare_module.prepare([src], tok, out, shard_tokens=300, workers=2)
print(json.dumps({"error": error, "recorded": state, "manifest": manifest}))
"""


@pytest.mark.parametrize("death", ["os._exit(1)", "os.kill(os.getpid(), signal.SIGKILL)"])
def test_a_worker_that_dies_is_one_error_line_and_the_rerun_resumes(corpus, tmp_path, monkeypatch,
                                                                    death):
    _, tok_path, _ = corpus
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS * 2))
    monkeypatch.setattr(prepare_module, "MIN_UNIT_BYTES", 2000)
    reference = prepare([src], tok_path, tmp_path / "reference", shard_tokens=300)
    (tmp_path / "dying.py").write_text(DYING_WORKER.format(death=death))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    out = tmp_path / "out"
    result = json.loads(_python(DIES_THEN_RESUMES, str(src), str(tok_path), str(out), timeout=120,
                                env=env))
    assert result["error"] == (
        "a prepare worker process died without an error (BrokenProcessPool: killed by a signal or "
        "out of memory?); finished units are kept: re-run the same command to resume"
    )
    assert "unit-000001.json" not in result["recorded"]
    manifest = result["manifest"]
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in reference["shards"]]
    assert manifest["totals"] == reference["totals"]
    assert verify_dataset(out)["tokens"] == reference["totals"]["tokens"]
