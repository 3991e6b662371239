"""Document masking in every layout that supports it reproduces the local engine's masked curve
(fp32, CPU, gloo), validation included, on data whose windows mostly hold a document boundary."""

import json

import pytest
import yaml

from bigtrain.config import from_dict
from bigtrain.train.loop import train
from tests.helpers import curve, parity_config, torchrun

STEPS = 5


def masked_config(data, run_dir) -> dict:
    cfg = parity_config(data, run_dir, STEPS)
    cfg["model"]["max_seq_len"] = cfg["data"]["seq_len"] = 64
    cfg["data"]["document_masking"] = True
    return cfg


# reset_positions with YaRN under sp=2: each rank holds half of every window, so RoPE must restart
# at each document by its global offset, through scaled tables
RESET_YARN = {"data": {"reset_positions": True},
              "model": {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_seq_len": 16}}}
RESET = {"data": {"reset_positions": True}}  # pp=2: the positions travel along the stages with the documents


def with_extra(cfg: dict, extra: dict) -> dict:
    for section, values in extra.items():
        cfg[section].update(values)
    return cfg


@pytest.fixture(scope="module")
def reference(short_documents_data, tmp_path_factory):
    """The local engine's curves (masked, unmasked) for the config with `extra` sections, each run once."""
    runs = {}

    def run(extra: dict) -> tuple:
        key = json.dumps(extra, sort_keys=True)
        if key not in runs:
            masked, unmasked = tmp_path_factory.mktemp("masked"), tmp_path_factory.mktemp("unmasked")
            train(from_dict(with_extra(masked_config(short_documents_data, masked), extra)), console=False)
            cfg = from_dict(with_extra(masked_config(short_documents_data, unmasked), extra))
            cfg.data.document_masking = cfg.data.reset_positions = False
            train(cfg, console=False)
            runs[key] = curve(masked), curve(unmasked)
        return runs[key]

    return run


LAYOUTS = {  # nproc, overrides, config sections that the reference shares
    "dp2-zero2": (2, ["parallel.zero_stage=2", "data.micro_batch=4"], {}),
    "tp2-sp": (2, ["parallel.tp=2"], {}),
    "sp2-checkpointing-reset-yarn": (2, ["parallel.sp=2", "parallel.activation_checkpointing=true"], RESET_YARN),
    "pp2-reset": (2, ["parallel.pp=2", "data.micro_batch=4", "train.grad_accum=2"], RESET),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_masked_layout_matches_single_process(layout, reference, short_documents_data, tmp_path):
    nproc, overrides, extra = LAYOUTS[layout]
    cfg = with_extra(masked_config(short_documents_data, tmp_path / "run"), extra)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    torchrun(nproc, "-m", "bigtrain", "train", str(tmp_path / "config.yaml"), "parallel.engine=deepspeed", *overrides)
    (losses, norms, val), ((ref_losses, ref_norms, ref_val), (unmasked, _, _)) = curve(tmp_path / "run"), reference(extra)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert norms == pytest.approx(ref_norms, rel=1e-4)
    assert val == pytest.approx(ref_val, rel=1e-5) and len(val) == 2
    assert abs(ref_losses[0] / unmasked[0] - 1) > 1e-4  # the data's boundaries make masking matter


WARMUP_LAYOUTS = {
    "sp2": ["parallel.sp=2"],
    # the pipeline engine caches activation shapes: every change of window length resets them
    "pp2": ["parallel.pp=2", "data.micro_batch=4", "train.grad_accum=2"],
}


@pytest.mark.parametrize("layout", WARMUP_LAYOUTS)
def test_warmup_with_masking_matches_single_process(layout, short_documents_data, tmp_path):
    """Sequence-length warmup (16 → 64 tokens) with document masking: sp=2 splits each short window,
    pp=2 sends windows of each length through its stages (validation at full length before and
    after); both reproduce the local engine's curve."""
    cfg = masked_config(short_documents_data, tmp_path / "local")
    cfg["data"]["seq_len_warmup"] = {"start": 16, "steps": 4}
    train(from_dict(cfg), console=False)
    cfg["run"]["dir"] = str(tmp_path / layout)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    torchrun(2, "-m", "bigtrain", "train", str(tmp_path / "config.yaml"), "parallel.engine=deepspeed",
             *WARMUP_LAYOUTS[layout])
    (losses, norms, val), (ref_losses, ref_norms, ref_val) = curve(tmp_path / layout), curve(tmp_path / "local")
    assert losses == pytest.approx(ref_losses, rel=1e-5) and norms == pytest.approx(ref_norms, rel=1e-4)
    assert val == pytest.approx(ref_val, rel=1e-5) and len(val) == 2
    lengths = [json.loads(line).get("seq_len") for line in (tmp_path / layout / "metrics.jsonl").read_text().splitlines()]
    assert [n for n in lengths if n] == [16, 16, 32, 32, 64]
