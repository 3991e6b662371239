import json

import pytest
import torch
from safetensors.torch import load_file

from bigtrain.config import from_dict
from bigtrain.errors import BigtrainError
from bigtrain.train.loop import train
from tests.helpers import read_metrics, tiny_config


def test_loss_decreases_and_run_directory_is_complete(stdlib_data, tmp_path):
    result = train(tiny_config(stdlib_data, tmp_path / "run"), console=False)
    assert result.step == 60
    # uniform guessing over 512 tokens is ln(512) = 6.24; 60 steps must get well below it
    assert result.first_val.loss > 6.0
    assert result.val.loss < result.first_val.loss - 1.0
    assert sum(result.losses[-10:]) / 10 < sum(result.losses[:10]) / 10 - 1.0
    records = read_metrics(tmp_path / "run")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [10, 20, 30, 40, 50, 60]
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "step_time_s"):
        assert key in steps[-1]
    assert steps[-1]["tokens"] == 60 * 8 * 64
    assert [r["step"] for r in records if "val_loss" in r] == [0, 30, 60]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step-0000060"
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_grad_accumulation_matches_larger_micro_batch(stdlib_data, tmp_path):
    big = tiny_config(stdlib_data, tmp_path / "big", steps=5)
    big.data.micro_batch = 8
    accum = tiny_config(stdlib_data, tmp_path / "accum", steps=5, grad_accum=4)
    accum.data.micro_batch = 2
    a, b = train(big, console=False).losses, train(accum, console=False).losses
    assert a == pytest.approx(b, rel=1e-5)


def test_resume_is_bitwise_identical(stdlib_data, tmp_path):
    straight = train(tiny_config(stdlib_data, tmp_path / "straight", steps=12, val_every=1000), console=False)

    first = tiny_config(stdlib_data, tmp_path / "resumed", steps=12, val_every=1000)
    first.checkpoint.every = 6
    head = train(first, console=False)  # runs all 12 steps, saving at 6 and 12
    assert head.losses == straight.losses
    # now resume from step 6 in a fresh run directory that only holds the step-6 checkpoint
    second = tiny_config(stdlib_data, tmp_path / "second", steps=12, val_every=1000)
    second.run.resume = str(tmp_path / "resumed" / "checkpoints" / "step-0000006")
    tail = train(second, console=False)
    assert tail.losses == straight.losses[6:]  # bitwise: same floats
    a = load_file(straight.checkpoint / "model.safetensors")
    b = load_file(tail.checkpoint / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_auto_continues_and_refuses_to_restart(stdlib_data, tmp_path):
    cfg = tiny_config(stdlib_data, tmp_path / "run", steps=6, val_every=1000)
    train(cfg, console=False)
    cfg.train.steps = 10
    with pytest.raises(BigtrainError, match="already has checkpoints; pass run.resume=auto"):
        train(cfg, console=False)
    cfg.run.resume = "auto"
    result = train(cfg, console=False)
    assert result.step == 10 and len(result.losses) == 4
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*")) == ["step-0000006", "step-0000010"]


def test_vocab_mismatch_is_refused(stdlib_data, tmp_path):
    cfg = tiny_config(stdlib_data, tmp_path / "run")
    cfg.model.vocab_size = 100
    with pytest.raises(BigtrainError, match="model.vocab_size=100 is too small"):
        train(cfg, console=False)


def test_streaming_backend_trains_and_resumes_exactly(stdlib_data, tmp_path):
    from bigtrain.data.mds import write_mds

    write_mds(stdlib_data[0], tmp_path / "bucket", 64)  # a directory standing in for s3://

    def streaming_config(name, **overrides):
        cfg = tiny_config(stdlib_data, tmp_path / name, steps=8, val_every=1000, **overrides)
        cfg.data.backend, cfg.data.remote, cfg.data.local = "streaming", str(tmp_path / "bucket"), str(tmp_path / f"cache-{name}")
        cfg.checkpoint.every = 4
        return cfg

    straight = train(streaming_config("straight"), console=False)
    assert straight.step == 8 and straight.losses[-1] < straight.losses[0]
    resumed = streaming_config("resumed")
    resumed.run.resume = str(tmp_path / "straight" / "checkpoints" / "step-0000004")
    assert train(resumed, console=False).losses == straight.losses[4:]


def test_streaming_backend_masks_documents_as_the_arrow_backend(short_documents_data, tmp_path):
    """Document masking on MDS shards converted from Arrow ones: unshuffled, both backends feed the
    same windows in the same order, so the masked losses agree; the EOS id comes from the tokenizer
    copied next to the MDS shards (the Arrow dataset is gone when the streaming run starts)."""
    import shutil

    from bigtrain.data.mds import write_mds

    shutil.copytree(short_documents_data[0], tmp_path / "arrow")
    write_mds(tmp_path / "arrow", tmp_path / "bucket", 64)
    data = (tmp_path / "arrow", short_documents_data[1])

    def run(name, masking=True):
        cfg = tiny_config(data, tmp_path / name, steps=3, validate=False, verify_checksums=False)
        cfg.data.shuffle, cfg.data.document_masking = False, masking
        return cfg

    arrow, unmasked = train(run("arrow"), console=False).losses, train(run("unmasked", False), console=False).losses
    shutil.rmtree(tmp_path / "arrow")
    cfg = run("streaming")
    cfg.data.backend, cfg.data.remote, cfg.data.local = "streaming", str(tmp_path / "bucket"), str(tmp_path / "cache")
    assert len(arrow) == 3 and train(cfg, console=False).losses == pytest.approx(arrow, rel=1e-6)
    assert abs(arrow[0] / unmasked[0] - 1) > 1e-4  # the windows hold document boundaries


def test_streaming_mixture_trains_and_resumes_exactly(stdlib_data, tmp_path):
    from bigtrain.config import SourceConfig
    from bigtrain.data.mds import cache_dir, write_mds

    for k, prepared in enumerate(stdlib_data):  # two MDS 'buckets' sharing the tokenizer
        write_mds(prepared, tmp_path / f"bucket{k}", 64)

    def mixture_config(name):
        cfg = tiny_config(stdlib_data, tmp_path / name, steps=4, val_every=1000)
        cfg.data.backend, cfg.data.local = "streaming", str(tmp_path / f"cache-{name}")
        cfg.data.sources = [SourceConfig(remote=str(tmp_path / f"bucket{k}"), weight=w) for k, w in ((0, 3.0), (1, 1.0))]
        cfg.checkpoint.every = 2
        return cfg

    straight = train(mixture_config("straight"), console=False)
    assert straight.step == 4 and straight.losses[-1] < straight.losses[0]
    for k in range(2):  # each source streamed into its own cache under data.local
        assert any(cache_dir(tmp_path / "cache-straight", str(tmp_path / f"bucket{k}")).glob("shard.*.mds"))
    state = json.loads((straight.checkpoint / "state.json").read_text())["loader"]
    assert state["weights"] == [0.75, 0.25] and state["consumed_windows"] == 32
    resumed = mixture_config("resumed")
    resumed.run.resume = str(tmp_path / "straight" / "checkpoints" / "step-0000002")
    assert train(resumed, console=False).losses == straight.losses[2:]


def test_run_seed_decides_the_initial_weights_and_the_losses(stdlib_data, tmp_path):
    def run(name, seed):
        cfg = tiny_config(stdlib_data, tmp_path / name, steps=3, val_every=1000)
        cfg.run.seed = seed
        return train(cfg, console=False)

    first, again, other = run("a", 7), run("b", 7), run("c", 8)
    assert (again.first_val.loss, again.losses) == (first.first_val.loss, first.losses)  # a seed repeats its run
    assert other.first_val.loss != first.first_val.loss  # validated before any step: other initial weights
    assert other.losses[0] != first.losses[0] and other.losses[-1] != first.losses[-1]


def test_training_refuses_fp8_on_cpu_before_building_a_model(tmp_path, monkeypatch):
    from bigtrain.train import loop

    monkeypatch.setattr(loop, "Llama", lambda *a: pytest.fail("a model was built"))
    monkeypatch.setattr(loop, "build_train_loader", lambda *a, **k: pytest.fail("data was read"))
    cfg = from_dict({"run": {"dir": str(tmp_path)}, "data": {"path": str(tmp_path / "none")},
                     "train": {"precision": "fp8", "device": "cpu"}})
    with pytest.raises(BigtrainError, match="train.precision=fp8 needs a CUDA GPU"):
        loop.train(cfg, console=False)
