"""Agreement, measured: bigtrain's lm-eval adapter on a trained checkpoint and lm-eval's own `hf`
model (transformers) on the `convert to-hf` export of the same checkpoint give the same
log-likelihoods (fp32: max |difference| <= 1e-4), the same accuracy on the shipped task, the same
rolling log-likelihoods and the same greedy generations. If either path drifts, this fails."""

import os

import pytest
import torch

from bigtrain.cli import main
from bigtrain.convert.consolidate import load_full_model
from bigtrain.eval.harness import BigtrainLM, TaskSuite, checkpoint_tokenizer
from bigtrain.train import loop
from tests.helpers import tiny_config

pytest.importorskip("transformers")
LIMIT = 100  # documents of the shipped task (400 log-likelihood requests)


class Request:
    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def both(stdlib_data, tmp_path_factory):
    """(bigtrain's adapter, lm-eval's HFLM) over one checkpoint trained for 40 steps."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(name, "1")
    from lm_eval.models.huggingface import HFLM

    tmp = tmp_path_factory.mktemp("agree")
    cfg = tiny_config(stdlib_data, tmp / "run", validate=False, verify_checksums=False, steps=150, val_every=1000)
    cfg.model.max_seq_len = cfg.data.seq_len = 128  # the longest documents are cut from the left
    checkpoint = loop.train(cfg, console=False).checkpoint
    assert main(["convert", "to-hf", str(checkpoint), str(tmp / "hf")]) == 0
    model, cfg, _ = load_full_model(checkpoint, torch.device("cpu"))
    ours = BigtrainLM(model, checkpoint_tokenizer(checkpoint), cfg.model.max_seq_len, batch_size=16, progress=False)
    theirs = HFLM(pretrained=str(tmp / "hf"), device="cpu", dtype="float32", batch_size=16)
    assert theirs.max_length == ours.max_length == 128
    return ours, theirs


def test_loglikelihoods_and_accuracy_agree(both):
    ours, theirs = both
    suite = TaskSuite(["python_next_line"], limit=LIMIT, progress=False)
    task = suite.load()["tasks"]["python_next_line"]
    task.build_all_requests(limit=LIMIT, rank=0, world_size=1)
    requests = task.instances
    assert len(requests) == 4 * LIMIT
    a, b = ours.loglikelihood(requests), theirs.loglikelihood(requests)
    diff = max(abs(x[0] - y[0]) for x, y in zip(a, b, strict=True))
    print(f"max |loglikelihood difference| over {len(requests)} requests: {diff:.2e}")
    assert diff <= 1e-4
    assert [x[1] for x in a] == [y[1] for y in b]  # greedy flags too
    assert min(x[0] for x in a) < -20  # real work: long continuations, left-truncated contexts
    acc = {name: suite.run(lm)["results"]["python_next_line"]["acc,none"] for name, lm in both_named(both)}
    print(f"accuracy on the first {LIMIT} documents: {acc}")
    assert acc["bigtrain"] == acc["hf"]


def both_named(both):
    return zip(("bigtrain", "hf"), both, strict=True)


def test_rolling_loglikelihoods_agree(both):
    texts = ["def add(a, b):\n    return a + b\n", "import os\n\n\nclass Path:\n    def __init__(self, p):\n"
             "        self.p = os.fspath(p)\n\n    def name(self):\n        return self.p.rsplit('/', 1)[-1]\n" * 6]
    assert len(both[0].tok_encode(texts[1])) > 2 * 128  # several windows
    ours, theirs = (lm.loglikelihood_rolling([Request(t) for t in texts]) for lm in both)
    print(f"rolling log-likelihoods: {ours} (bigtrain), {theirs} (hf)")
    assert ours == pytest.approx(theirs, abs=1e-4)


def test_greedy_generations_agree(both):
    prompts = ["def __init__(self", "import", "    for i in range(", "class Error(Exception):\n    "]
    kwargs = {"until": ["\n\n"], "max_gen_toks": 16, "do_sample": False}
    ours, theirs = (lm.generate_until([Request(p, dict(kwargs)) for p in prompts]) for lm in both)
    assert ours == theirs
    assert all(text.strip() for text in ours)  # something was generated
