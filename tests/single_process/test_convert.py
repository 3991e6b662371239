"""Conversion of trained checkpoints: a Hugging Face model trained on with `model.init_from`, a
local run exported to Hugging Face (weights and tokenizer), Llama/Qwen3/Qwen3-MoE logit parity
under transformers 5.x, and a reshard refused for an impossible layout."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bigtrain.checkpoint.io import load_trained_model
from bigtrain.cli import main
from bigtrain.data.tokenizer import TextTokenizer
from bigtrain.engine.update_gate import UpdateGate
from bigtrain.train import loop
from tests import hf_parity
from tests.helpers import random_hf_llama, tiny_config

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]
TRANSFORMERS5 = Path(os.environ.get("BIGTRAIN_TRANSFORMERS5", ROOT / ".cache" / "transformers5"))


def test_from_hf_matches_and_trains_with_init_from(stdlib_data, tmp_path):
    hf = random_hf_llama(tmp_path / "hf")
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "bt")]) == 0
    model, cfg, _ = load_trained_model(tmp_path / "bt", torch.device("cpu"))
    assert (cfg.model.n_kv_heads, cfg.model.ffn_hidden, cfg.model.rope_theta) == (2, 96, 50000.0)
    tokens = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=0, atol=1e-4)

    # continued pretraining starts from these weights: with an lr too small to move an fp32 weight
    # (|w| ~ 1e-2 has an ulp of ~1e-9) they come out unchanged
    train = tiny_config(stdlib_data, tmp_path / "run", validate=False, verify_checksums=False, steps=2, val_every=1000, lr=1e-30, warmup_steps=0)
    train.model = cfg.model
    train.model.init_from = str(tmp_path / "bt")
    result = loop.train(train, console=False)
    start, end = load_file(tmp_path / "bt" / "model.safetensors"), load_file(result.checkpoint / "model.safetensors")
    assert all(torch.equal(start[k], end[k]) for k in start)
    train.model.d_model = 128
    with pytest.raises(Exception, match="holds a model with model.d_model=64, but the config has model.d_model=128"):
        loop.build_engine(train, UpdateGate(), train.model.init_from)


def test_to_hf_of_a_local_checkpoint_loads_in_transformers(stdlib_data, tmp_path):
    cfg = tiny_config(stdlib_data, tmp_path / "run", validate=False, verify_checksums=False, steps=2, val_every=1000)
    cfg.model.tie_embeddings = True
    checkpoint = loop.train(cfg, console=False).checkpoint
    out = tmp_path / "hf"
    assert main(["convert", "to-hf", str(tmp_path / "run"), str(out), "--max-shard-size", "40KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and "lm_head.weight" not in index["weight_map"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True).eval()
    model, _, _ = load_trained_model(checkpoint, torch.device("cpu"))
    tokens = torch.randint(0, 512, (3, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens), rtol=0, atol=1e-4)

    ours = TextTokenizer.load(checkpoint / "tokenizer.json")
    theirs = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert theirs.eos_token_id == ours.eos_id == 0
    for text in ["def main():\n    return 42\n", "Ünïcödé — 日本語 ✓", "a literal <|endoftext|> is text", "  x  "]:
        assert theirs(text)["input_ids"] == ours.encode(text)
        assert theirs.decode(ours.encode(text)) == text



def test_reshard_refuses_an_impossible_layout(stdlib_data, tmp_path, capsys):
    cfg = tiny_config(stdlib_data, tmp_path / "run", steps=1, val_every=1000)
    result = loop.train(cfg, console=False)
    code = main(["convert", "reshard", str(result.checkpoint), str(tmp_path / "out"),
                 "parallel.engine=deepspeed", "parallel.tp=3"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("bigtrain: error: model.") and "not divisible by parallel.tp=3" in err
    assert not (tmp_path / "out").exists()


def test_conversion_matches_transformers_5(tmp_path):
    """tests/hf_parity.py in a process whose transformers is the 5.x that
    tools/install_transformers5.sh puts beside the environment's 4.x (CI installs it)."""
    if not (TRANSFORMERS5 / "transformers").is_dir():
        message = f"no transformers 5.x at {TRANSFORMERS5}: run tools/install_transformers5.sh"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    path = os.pathsep.join(filter(None, [str(TRANSFORMERS5), str(ROOT), os.environ.get("PYTHONPATH")]))
    # hub kernels (on by default in 5.x) would need the `kernels` package and the network
    env = {**os.environ, "PYTHONPATH": path, "USE_HUB_KERNELS": "NO", "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "tests.hf_parity"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results.pop("transformers").startswith("5.")
    moe = [n for n in hf_parity.HF_CASES if "moe" in n]
    assert set(results) == {*(f"from-hf {n}" for n in hf_parity.HF_CASES), *(f"from-hf {n} fused" for n in moe),
                            *(f"to-hf {n}" for n in hf_parity.BIGTRAIN_CASES), *(f"rope {n}" for n in hf_parity.ROPE_CASES)}
    assert max(results.values()) <= 1e-5, results
    assert max(v for k, v in results.items() if k.startswith("rope ")) <= 1e-6, results
