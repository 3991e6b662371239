"""A checkpoint written before ranks built on the meta device (tests/data/pre-meta-checkpoint,
made by tests/data/make_pre_meta_checkpoint.py at commit bea5c72) still resumes, continuing the
loss curve that code continued bit for bit, and still converts to transformers' Llama."""

import json
from pathlib import Path

import pytest
import torch

from bigtrain.checkpoint import io as ckpt
from bigtrain.checkpoint.format import read_config
from bigtrain.convert.hf import to_hf
from bigtrain.distributed.communicator import LoneProcess
from bigtrain.engine.local import local_engine
from bigtrain.engine.materialize import Materializer
from bigtrain.model import Llama

DATA = Path(__file__).parents[1] / "data" / "pre-meta-checkpoint"
EXPECTED = json.loads((DATA / "continued.json").read_text())
CHECKPOINT = DATA / EXPECTED["checkpoint"]


def test_it_resumes_where_the_code_that_wrote_it_did():
    cfg = read_config(CHECKPOINT)
    engine = local_engine(Llama(cfg.model, device="meta"), cfg.train,
                          materialize=Materializer(cfg.model, torch.device("cpu"), seed=0))
    ckpt.load_checkpoint(CHECKPOINT, engine, LoneProcess())
    tokens = torch.randint(0, 97, (4, 17), generator=torch.Generator().manual_seed(1))
    assert [float(engine.train_step([tokens], 1e-2).loss) for _ in range(3)] == EXPECTED["continued"]


def test_it_converts_to_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    to_hf(CHECKPOINT, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    model, _, _ = ckpt.load_trained_model(CHECKPOINT, torch.device("cpu"))
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens), rtol=0, atol=1e-5)
