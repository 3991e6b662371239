"""Hugging Face conversion both ways, `model.init_from`, and refusals that leave OUT untouched."""

import json

import pytest
import torch
from safetensors.torch import load_file

from bigtrain.checkpoint.io import load_trained_model
from bigtrain.cli import main
from bigtrain.data.tokenizer import TextTokenizer
from bigtrain.engine.update_gate import UpdateGate
from bigtrain.train import loop
from tests.unit.test_checkpoint_safety import tiny_config

transformers = pytest.importorskip("transformers")


def random_hf_llama(path, tie=False, **extra):
    """A randomly initialised LlamaForCausalLM with grouped-query attention, saved by transformers."""
    torch.manual_seed(3)
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=50000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=tie, **extra)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    return model


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
    train = tiny_config(stdlib_data, tmp_path / "run", steps=2, eval_every=1000, lr=1e-30, warmup_steps=0)
    train.model = cfg.model
    train.model.init_from = str(tmp_path / "bt")
    result = loop.train(train, console=False)
    start, end = load_file(tmp_path / "bt" / "model.safetensors"), load_file(result.checkpoint / "model.safetensors")
    assert all(torch.equal(start[k], end[k]) for k in start)
    train.model.d_model = 128
    with pytest.raises(Exception, match="holds a model with model.d_model=64, but the config has model.d_model=128"):
        loop.build_engine(train, UpdateGate(None), train.model.init_from)


def test_to_hf_of_a_local_checkpoint_loads_in_transformers(stdlib_data, tmp_path):
    cfg = tiny_config(stdlib_data, tmp_path / "run", steps=2, eval_every=1000)
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


def test_weights_without_a_hugging_face_counterpart_are_refused():
    from bigtrain.convert.hf import to_hf_name

    assert to_hf_name("layers.2.self_attn.k_proj.weight", 2) == "model.layers.1.self_attn.k_proj.weight"
    with pytest.raises(Exception, match="layers.1.self_attn.q_norm.weight has no counterpart in Hugging Face's"):
        to_hf_name("layers.1.self_attn.q_norm.weight", 2)


def test_refusals_leave_out_untouched(stdlib_data, tmp_path, capsys):
    random_hf_llama(tmp_path / "scaled", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    assert main(["convert", "from-hf", str(tmp_path / "scaled"), str(tmp_path / "a")]) == 1
    assert "rope_scaling=" in capsys.readouterr().err and not (tmp_path / "a").exists()

    random_hf_llama(tmp_path / "hf")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "taken")]) == 1
    assert capsys.readouterr().err.strip() == f"bigtrain: error: {tmp_path / 'taken'} already exists; pass --overwrite to replace it"
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["notes.txt"]
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "taken"), "--overwrite"]) == 0
    assert (tmp_path / "taken" / "model.safetensors").is_file() and not (tmp_path / "taken" / "notes.txt").exists()

    assert main(["convert", "reshard", str(tmp_path / "taken"), str(tmp_path / "b"), "parallel.tp=2"]) == 1
    assert "parallel.tp, parallel.pp, parallel.sp and parallel.zero_stage need parallel.engine=deepspeed" in capsys.readouterr().err
    assert main(["convert", "reshard", str(tmp_path / "taken"), str(tmp_path / "b"), "parallel.engine=deepspeed",
                 "parallel.tp=3"]) == 1
    assert capsys.readouterr().err.strip() == "bigtrain: error: model.n_heads=4 is not divisible by parallel.tp=3"
    assert main(["convert", "reshard", str(tmp_path / "taken"), str(tmp_path / "b"), "parallel.tp=1"]) == 1
    assert "holds no readable AdamW state (a weights-only checkpoint" in capsys.readouterr().err
    assert main(["convert", "to-hf", str(tmp_path / "taken"), str(tmp_path / "hf-again")]) == 0  # weights suffice
    assert "wrote" in capsys.readouterr().err
    assert main(["convert", "to-hf", str(tmp_path / "nowhere"), str(tmp_path / "c")]) == 1
    assert capsys.readouterr().err.strip() == f"bigtrain: error: checkpoint not found: {tmp_path / 'nowhere'}"
