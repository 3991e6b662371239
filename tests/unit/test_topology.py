import os
import subprocess
import sys
from pathlib import Path

import pytest

from bigtrain.config import from_dict, load_config
from bigtrain.distributed.topology import (
    ProcessEnv,
    export_rendezvous_env,
    first_host,
    process_env,
)
from bigtrain.engine.deepspeed.config import deepspeed_config, merge
from bigtrain.errors import BigtrainError
from bigtrain.model import count_params
from bigtrain.parallel.layout import check_layout
from bigtrain.parallel.planner import zero_communication


def config(**parallel):
    return from_dict({
        "model": {"vocab_size": 512, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2},
        "data": {"micro_batch": 4},
        "parallel": {"engine": "deepspeed", **parallel},
    })


@pytest.mark.parametrize(
    "parallel, world, message",
    [
        ({"tp": 2, "pp": 2}, 6, "world size 6 is not divisible by parallel.tp × parallel.pp × parallel.sp = 4"),
        ({"tp": 4}, 4, "model.n_kv_heads=2 is not divisible by parallel.tp=4"),
        ({"tp": 8}, 8, "model.n_heads=4 is not divisible by parallel.tp=8"),
        ({"pp": 4}, 4, "model.n_layers=2 is fewer than parallel.pp=4 pipeline stages"),
        ({"pp": 2, "zero_stage": 2}, 2, "parallel.zero_stage=2 cannot be combined with pipeline parallelism"),
        ({"engine": "local"}, 2, "parallel.engine=local runs one process, but 2 were launched"),
        ({"engine": "local", "sp": 2}, 1, "parallel.ep and parallel.zero_stage need parallel.engine=deepspeed"),
        ({"sp": 2, "tp": 2}, 6, "world size 6 is not divisible by parallel.tp × parallel.pp × parallel.sp = 4"),
        ({"sp": 4}, 4, "model.n_kv_heads=2 is not divisible by parallel.sp × parallel.tp = 4 (Ulysses"),
        ({"sp": 2, "tp": 2}, 4, "model.n_kv_heads=2 is not divisible by parallel.sp × parallel.tp = 4"),
        ({"sp": 8}, 8, "model.n_heads=4 is not divisible by parallel.sp × parallel.tp = 8"),
        ({"sp": 3}, 3, "data.seq_len=256 is not divisible by parallel.sp=3"),
    ],
)
def test_impossible_layouts_are_refused(parallel, world, message):
    with pytest.raises(BigtrainError, match=message.replace("×", ".").replace("(", r"\(")):
        check_layout(config(**parallel), world)


def test_global_batch_must_match_the_layout():
    cfg = config(tp=2)
    cfg.train.global_batch = 16
    with pytest.raises(BigtrainError, match=r"train.global_batch=16 but .* = 4 × 1 × 2 = 8"):
        check_layout(cfg, 4)
    cfg.train.global_batch = 8
    assert check_layout(cfg, 4) == 2  # dp = 4 / tp


def test_ranks_from_torchrun_or_slurm(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(key, raising=False)
    assert process_env() == ProcessEnv(0, 1, 0)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert (process_env().rank, process_env().world_size, process_env().local_rank) == (5, 8, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert (process_env().rank, process_env().world_size, process_env().local_rank) == (3, 4, 3)


def test_deepspeed_json_from_config_and_overrides(tmp_path):
    cfg = config(zero_stage=2)
    cfg.train.grad_accum = 2
    ds = deepspeed_config(cfg, dp=2)
    assert ds["train_batch_size"] == 4 * 2 * 2
    assert ds["gradient_accumulation_steps"] == 2 and ds["zero_optimization"]["stage"] == 2
    assert ds["gradient_clipping"] == 1.0
    extra = tmp_path / "ds.json"
    extra.write_text('{"zero_optimization": {"reduce_bucket_size": 1000}, "steps_per_print": 5}')
    cfg.parallel.deepspeed_overrides = str(extra)
    ds = deepspeed_config(cfg, dp=2)
    assert ds["zero_optimization"] == {**deepspeed_config(config(zero_stage=2), 2)["zero_optimization"], "reduce_bucket_size": 1000}
    assert ds["steps_per_print"] == 5
    assert merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}}


@pytest.mark.parametrize("nodelist, first", [
    ("vm", "vm"), ("gpu[07-09,12],cpu1", "gpu07"), ("a100-[3,5]", "a100-3"), ("n1,n2", "n1"), ("x[001]-ib", "x001-ib"),
])
def test_first_host_of_a_slurm_node_list(nodelist, first):
    assert first_host(nodelist) == first


def test_plain_srun_tasks_get_torch_rendezvous_variables(monkeypatch):
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
           "SLURM_STEP_NODELIST": "gpu[03-06]", "SLURM_JOB_NODELIST": "gpu[01-06]"}
    monkeypatch.setattr(os, "environ", env)  # a private environment: nothing leaks into other tests
    export_rendezvous_env()
    assert process_env() == ProcessEnv(5, 8, 1)
    assert [env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")] == \
        ["5", "8", "1", "gpu03", str(20000 + 123456 % 20000)]
    env.update(MASTER_PORT="31000", RANK="5")  # what the user or torchrun set is kept
    export_rendezvous_env()
    assert env["MASTER_PORT"] == "31000"


@pytest.mark.parametrize("name, d, block", [("125m", 768, 7_079_424), ("1b", 2048, 60_821_504),
                                            ("7b", 4096, 202_383_360)])
def test_zero_overlaps_communication_in_buckets_sized_from_the_model(name, d, block):
    cfg = load_config(Path(__file__).parents[2] / "configs" / f"{name}.yaml")
    cfg.train.device, cfg.data.micro_batch, cfg.train.grad_accum = "cpu", 1, 1
    for stage in (1, 2):  # Megatron-LM's gradient bucket, max(4e7, 1e6·dp) elements
        cfg.parallel.zero_stage = stage
        for dp, bucket in ((8, 40_000_000), (64, 64_000_000)):
            zero = deepspeed_config(cfg, dp)["zero_optimization"]
            assert zero["overlap_comm"] and zero["stage"] == stage
            assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == bucket
    cfg.parallel.zero_stage = 3
    zero = deepspeed_config(cfg, 8)["zero_optimization"]
    assert zero["overlap_comm"] and zero["reduce_bucket_size"] == d * d
    assert zero["stage3_prefetch_bucket_size"] == block and zero["stage3_param_persistence_threshold"] == 10 * d
    assert zero["stage3_max_live_parameters"] == zero["stage3_max_reuse_distance"] == 10**9
    big = load_config(Path(__file__).parents[2] / "configs" / "70b.yaml").model  # two 856M blocks stay live
    assert zero_communication(big, 3, 8)["stage3_max_live_parameters"] == 2 * 855_654_400
    small = config(zero_stage=2)  # a model smaller than a bucket gets one bucket of its own size
    assert deepspeed_config(small, 2)["zero_optimization"]["reduce_bucket_size"] == count_params(small.model).total
    assert "overlap_comm" not in deepspeed_config(config(zero_stage=0), 2)["zero_optimization"]


def test_a_process_group_the_caller_made_is_ended_at_exit(tmp_path):
    """A script that starts torch.distributed itself (as `deepspeed.init_distributed` does) and then
    trains still has its group destroyed before the interpreter's teardown (gloo aborts the exit on
    a group left alive). The checker registered first runs last."""
    script = tmp_path / "script.py"
    script.write_text(
        "import atexit, torch.distributed as dist\n"
        "from bigtrain.config import from_dict\n"
        "from bigtrain.distributed.topology import init_processes\n"
        "atexit.register(lambda: print('destroyed' if not dist.is_initialized() else 'alive'))\n"
        "dist.init_process_group('gloo', init_method='tcp://127.0.0.1:0', rank=0, world_size=1)\n"
        "init_processes(from_dict({'parallel': {'backend': 'gloo'}}))\n"
        "init_processes(from_dict({'parallel': {'backend': 'gloo'}}))\n")
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["destroyed"]
