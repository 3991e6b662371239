"""DeepSpeed checkpoints: exact resume under ZeRO 1/2/3, refusal of pickled code, the bad-step
policy, conversion of ZeRO-3 and TP=2×PP=2 checkpoints (to Hugging Face, and resharded to one
process), and resuming under another layout (resharded to DeepSpeed layouts, or straight from the
single-process layout): training continues on the single-process loss curve."""

import json
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file

from bigtrain.checkpoint.format import MOMENTS
from bigtrain.checkpoint.io import load_trained_model
from bigtrain.config import from_dict, load_config
from bigtrain.convert.consolidate import consolidate
from bigtrain.convert.hf import to_hf
from bigtrain.convert.reshard import reshard
from bigtrain.train.loop import train
from tests.helpers import ranks_config, torchrun

N = 3  # steps before and after the checkpoint


@pytest.fixture(scope="module")
def worker(stdlib_data, tmp_path_factory):
    """One 2-rank launch running every DeepSpeed scenario of checkpoint_worker.py."""
    out = tmp_path_factory.mktemp("ds")
    (out / "config.yaml").write_text(yaml.safe_dump(ranks_config(stdlib_data, out / "unused", N)))
    torchrun(2, os.path.join(os.path.dirname(__file__), "checkpoint_worker.py"), str(out / "config.yaml"), str(out))
    return out, json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def local_run(stdlib_data, tmp_path_factory):
    """The single-process run of 2N steps that every layout must continue (checkpoint at N)."""
    cfg = from_dict(ranks_config(stdlib_data, tmp_path_factory.mktemp("local"), N))
    cfg.data.micro_batch = 8
    return train(cfg, console=False)


@pytest.fixture(scope="module")
def local_straight(local_run):
    return local_run.losses


WARMUP = {"start": 16, "steps": 4}  # 16-token windows for steps 0-3, 32 from step 4: the resume at N is inside


@pytest.fixture(scope="module")
def local_warmup_run(stdlib_data, tmp_path_factory):
    """`local_run` with a sequence-length warmup."""
    cfg = ranks_config(stdlib_data, tmp_path_factory.mktemp("local-warmup"), N)
    cfg["data"].update(micro_batch=8, seq_len_warmup=WARMUP)
    return train(from_dict(cfg), console=False)


@pytest.fixture(scope="module")
def resumed_elsewhere(stdlib_data, local_run, local_warmup_run, tmp_path_factory):
    """One 2-rank launch of reshard_worker.py: checkpoints resumed under other layouts."""
    out = tmp_path_factory.mktemp("reshard")
    (out / "config.yaml").write_text(yaml.safe_dump(ranks_config(stdlib_data, out / "unused", N)))
    torchrun(2, os.path.join(os.path.dirname(__file__), "reshard_worker.py"), str(out / "config.yaml"), str(out),
             *(str(run.run_dir / "checkpoints" / f"step-{N:07d}") for run in (local_run, local_warmup_run)))
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_resume_is_bitwise_exact(stage, worker):
    results = worker[1][f"zero{stage}"]
    assert len(results["straight"]) == 2 * N
    assert results["resumed"] == results["straight"][N:]  # bitwise: the same floats


def test_malicious_deepspeed_file_is_refused(worker):
    out, results = worker
    assert not results["pwned"]  # the payload never ran
    message = results["evil"]
    assert isinstance(message, str) and "\n" not in message
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt holds a pickled io.open; refusing" in message


@pytest.mark.parametrize("stage", [0, 2])
def test_nan_step_is_skipped_under_deepspeed(stage, worker):
    losses = worker[1][f"nan-zero{stage}"]
    assert len(losses) == N and losses[1] != losses[1]  # step 2 was poisoned
    assert all(x == x for x in (losses[0], losses[2]))  # and training went on with finite losses
    assert worker[1][f"nan-zero{stage}-skipped"] == [0, 1, 1]


def test_zero3_to_hf_and_reshard_to_one_process(worker, local_straight, tmp_path):
    transformers = pytest.importorskip("transformers")
    out, results = worker
    checkpoint = out / "z3" / "checkpoints" / f"step-{N:07d}"
    to_hf(checkpoint, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    gathered = load_file(checkpoint / "model.safetensors")  # what the ZeRO-3 run gathered itself
    model, _, _ = load_trained_model(checkpoint, torch.device("cpu"))
    assert all(torch.equal(gathered[k], v) for k, v in model.state_dict().items() if k in gathered)
    tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens), rtol=0, atol=1e-4)

    reshard(checkpoint, tmp_path / "one", ["parallel.engine=local", "parallel.zero_stage=0", "data.micro_batch=8"])
    cfg = load_config(tmp_path / "one" / "config.yaml", [f"run.dir={tmp_path / 'continued'}",
                                                          f"run.resume={tmp_path / 'one'}"])
    continued = train(cfg, console=False).losses
    assert continued == pytest.approx(results["zero3"]["straight"][N:], rel=1e-5, abs=0)
    assert continued == pytest.approx(local_straight[N:], rel=2e-5, abs=0)  # two hops of ZeRO-3 vs local drift


def assert_hf_logits_match(checkpoint, one_process, hf_dir) -> None:
    """`to-hf` of `checkpoint` gives, in transformers, the logits of its one-process reshard."""
    transformers = pytest.importorskip("transformers")
    to_hf(checkpoint, hf_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    model, _, _ = load_trained_model(one_process, torch.device("cpu"))
    tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens), rtol=0, atol=1e-4)


def test_tp2_pp2_to_hf_and_reshard_to_one_process(stdlib_data, local_straight, tmp_path):
    pytest.importorskip("transformers")  # before the launch
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(ranks_config(stdlib_data, tmp_path / "run", N)))
    torchrun(4, "-m", "bigtrain", "train", str(tmp_path / "config.yaml"), "parallel.engine=deepspeed",
             "parallel.tp=2", "parallel.pp=2", "data.micro_batch=2", "train.grad_accum=4")
    checkpoint = tmp_path / "run" / "checkpoints" / f"step-{N:07d}"
    reshard(checkpoint, tmp_path / "one", ["parallel.engine=local", "parallel.tp=1", "parallel.pp=1",
                                           "data.micro_batch=8", "train.grad_accum=1"])
    cfg = load_config(tmp_path / "one" / "config.yaml", [
        f"run.dir={tmp_path / 'continued'}", f"run.resume={tmp_path / 'one'}"])
    assert train(cfg, console=False).losses == pytest.approx(local_straight[N:], rel=1e-5, abs=0)

    assert_hf_logits_match(checkpoint, tmp_path / "one", tmp_path / "hf")


def run_losses(run_dir) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_sp2_checkpoint_resumes_exactly_reshards_and_converts(stdlib_data, local_run, local_straight, tmp_path):
    """Sequence parallelism shards no parameters: an SP=2 ZeRO-1 run follows the single-process
    curve, resumes from its checkpoint exactly, and the checkpoint reshards to one process and
    converts to Hugging Face; the single-process checkpoint resharded to SP=2 continues its curve."""
    pytest.importorskip("transformers")  # before the launch
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(ranks_config(stdlib_data, tmp_path / "run", N)))
    sp2 = [str(tmp_path / "config.yaml"), "parallel.engine=deepspeed", "parallel.sp=2", "parallel.zero_stage=1",
           "data.micro_batch=8"]
    torchrun(2, "-m", "bigtrain", "train", *sp2)
    straight = run_losses(tmp_path / "run")
    assert straight == pytest.approx(local_straight, rel=1e-5, abs=0)
    checkpoint = tmp_path / "run" / "checkpoints" / f"step-{N:07d}"
    torchrun(2, "-m", "bigtrain", "train", *sp2, f"run.dir={tmp_path / 'resumed'}", f"run.resume={checkpoint}")
    assert run_losses(tmp_path / "resumed") == straight[N:]
    local_checkpoint = local_run.run_dir / "checkpoints" / f"step-{N:07d}"
    reshard(local_checkpoint, tmp_path / "to-sp2", ["parallel.engine=deepspeed", "parallel.sp=2",
                                                    "parallel.zero_stage=1"])
    torchrun(2, "-m", "bigtrain", "train", str(tmp_path / "to-sp2" / "config.yaml"),
             f"run.dir={tmp_path / 'from-local'}", f"run.resume={tmp_path / 'to-sp2'}")
    assert run_losses(tmp_path / "from-local") == pytest.approx(local_straight[N:], rel=1e-5, abs=0)

    reshard(checkpoint, tmp_path / "one", ["parallel.engine=local", "parallel.sp=1", "parallel.zero_stage=0"])
    cfg = load_config(tmp_path / "one" / "config.yaml", [
        f"run.dir={tmp_path / 'continued'}", f"run.resume={tmp_path / 'one'}"])
    assert train(cfg, console=False).losses == pytest.approx(local_straight[N:], rel=1e-5, abs=0)
    assert_hf_logits_match(checkpoint, tmp_path / "one", tmp_path / "hf")


@pytest.mark.parametrize("case", ["local-to-dp2-zero2", "local-resumed-as-tp2", "tp2-to-pp2-zero1",
                                  "tp2-to-dp2-zero3"])
def test_resume_under_another_layout_continues_the_loss_curve(case, resumed_elsewhere, local_straight):
    """Single-process → DP=2 ZeRO-2 (resharded) and → TP=2 (resumed as it is); TP=2 → PP=2 ZeRO-1 and
    → DP=2 ZeRO-3 (resharded): the last N losses of the uninterrupted single-process run."""
    results = resumed_elsewhere[1]
    assert results["tp2"] == pytest.approx(local_straight, rel=1e-5, abs=0)
    assert results[case] == pytest.approx(local_straight[N:], rel=1e-5, abs=0)
    assert local_straight[-1] < local_straight[N - 1] - 0.05  # the continued curve actually moves


def test_warmup_resume_on_another_data_parallel_size_continues_the_loss_curve(resumed_elsewhere, local_warmup_run):
    """A single-process run with a sequence-length warmup, resharded at step N (16-token windows)
    and resumed at DP=2 ZeRO-2: the same windows, cut the same way, so its last N losses."""
    losses = resumed_elsewhere[1]["warmup-local-to-dp2-zero2"]
    assert losses == pytest.approx(local_warmup_run.losses[N:], rel=1e-5, abs=0)
    lengths = [json.loads(line).get("seq_len") for line in
               (resumed_elsewhere[0] / "warmup-dp2-zero2-run" / "metrics.jsonl").read_text().splitlines()]
    assert [n for n in lengths if n] == [16, 32, 32]


def test_resharded_checkpoint_reshards_and_converts_again(resumed_elsewhere, tmp_path):
    out = resumed_elsewhere[0]
    tp2 = consolidate(out / "tp2" / "checkpoints" / f"step-{N:07d}")
    reshard(out / "dp2-zero3", tmp_path / "again", ["parallel.engine=local", "parallel.zero_stage=0",
                                                     "data.micro_batch=8"])
    again = consolidate(tmp_path / "again")
    assert again.adam_step == tp2.adam_step == N
    for name, weight in tp2.weights.items():
        assert torch.equal(again.weights[name], weight)
        assert all(torch.equal(again.moments[name][m], tp2.moments[name][m]) for m in MOMENTS)


def test_deepspeed_checkpoint_of_another_layout_is_refused(resumed_elsewhere):
    message = resumed_elsewhere[1]["tp2-resumed-as-pp2"]
    assert isinstance(message, str) and "\n" not in message
    assert message.endswith("holds DeepSpeed state for ZeRO-0, tp=2, pp=1, this run is ZeRO-0, tp=1, pp=2: resume "
                            "from `bigtrain convert reshard " + message.split(" holds ")[0] + " OUT` with this run's "
                            "parallel.* settings")
