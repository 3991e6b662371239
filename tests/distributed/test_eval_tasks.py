"""lm-eval tasks and DeepSpeed: `eval.tasks` on two data-parallel ranks (ZeRO-1) scores each rank's
share and logs what one process scores on the saved checkpoint; a tensor-parallel checkpoint
(no full weights on disk) is consolidated on the fly by `bigtrain eval --tasks`, with the numbers
of its single-process reshard."""

import json

import yaml

from bigtrain.cli import main
from bigtrain.convert.reshard import reshard
from tests.helpers import torchrun

LIMIT, KEY = 30, "eval/python_next_line/acc"


def config(data, run_dir) -> dict:
    return {
        "run": {"name": "tasks", "dir": str(run_dir), "seed": 5},
        "model": {"vocab_size": 512, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64},
        "data": {"path": str(data[0]), "val_path": str(data[1]), "seq_len": 64, "micro_batch": 4},
        "train": {"steps": 20, "lr": 3e-3, "warmup_steps": 2, "device": "cpu", "global_batch": 8},
        "checkpoint": {"every": 20},
        "log": {"every": 10},
        "eval": {"limit": LIMIT, "every": 20, "val_every": 1000, "val_batches": 1},
    }


def cli_accuracy(checkpoint, capsys) -> float:
    assert main(["eval", str(checkpoint), "--tasks", "python_next_line", "--limit", str(LIMIT), "--device", "cpu"]) == 0
    capsys.readouterr()
    saved = json.loads((checkpoint.parent / f"lm_eval-{checkpoint.name}.json").read_text())
    return saved["evaluations"][-1]["results"]["python_next_line"]["acc,none"]


def test_two_data_parallel_ranks_log_what_one_process_scores(stdlib_data, tmp_path, capsys):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config(stdlib_data, tmp_path / "run")))
    torchrun(2, "-m", "bigtrain", "train", str(tmp_path / "config.yaml"), "parallel.engine=deepspeed",
             "parallel.zero_stage=1", "eval.tasks=[python_next_line]")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if KEY in r]
    assert [r["step"] for r in evals] == [0, 20]  # rank 0 logged once per evaluation
    assert evals[-1][KEY] * LIMIT == round(evals[-1][KEY] * LIMIT)  # over all LIMIT documents, not a share
    assert cli_accuracy(tmp_path / "run" / "checkpoints" / "step-0000020", capsys) == evals[-1][KEY]


def test_tensor_parallel_checkpoint_is_consolidated_for_tasks(stdlib_data, tmp_path, capsys):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config(stdlib_data, tmp_path / "run")))
    torchrun(2, "-m", "bigtrain", "train", str(tmp_path / "config.yaml"), "parallel.engine=deepspeed", "parallel.tp=2",
             "data.micro_batch=8")
    checkpoint = tmp_path / "run" / "checkpoints" / "step-0000020"
    assert not (checkpoint / "model.safetensors").exists()  # tensor-parallel shards only
    reshard(checkpoint, tmp_path / "one", ["parallel.engine=local", "parallel.tp=1"])
    assert cli_accuracy(checkpoint, capsys) == cli_accuracy(tmp_path / "one", capsys)
    # generation reads the tensor-parallel checkpoint as well: the same greedy text as its reshard
    texts = []
    for source in (checkpoint, tmp_path / "one"):
        assert main(["generate", str(source), "--prompt", "def ", "--temperature", "0", "--max-new-tokens", "16",
                     "--device", "cpu"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and len(texts[0]) > len("def \n")  # 16 new tokens (spaces, for so small a model)
