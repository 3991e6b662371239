import dataclasses
import json
import types
import typing
from pathlib import Path

import pytest

from bigtrain.config import RANGE, Config, load_config, save_config
from bigtrain.errors import BigtrainError

CONFIGS = Path(__file__).parents[2] / "configs"


def numeric_fields(cls: type = Config, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every int or float key of the config tree (Optional ones too), found from the type hints;
    a list of sections contributes its entries' keys as `name[].key`."""
    found, hints = {}, typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint, key = hints[f.name], prefix + f.name
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) is list:
            (hint,), key = typing.get_args(hint), key + "[]"
        if dataclasses.is_dataclass(hint):
            found.update(numeric_fields(hint, key + "."))
        elif hint in (int, float):
            found[key] = f
    return found


NUMERIC = numeric_fields()
WHOLE_SECTIONS = {"model.rope_scaling": {"type": "yarn", "factor": 2, "original_max_seq_len": 64}}  # with required keys


def out_of_range_values(f: dataclasses.Field) -> list:
    """One value just past each bound of the field's declared range."""
    rng = f.metadata[RANGE]
    values = [rng.gt, None if rng.ge is None else rng.ge - 1, rng.lt, None if rng.le is None else rng.le + 1]
    return [v for v in values if v is not None]


def as_override(key: str, value) -> tuple[str, str]:
    """The override that sets `key` (a list entry's key as `name[].key`) and the key the error names."""
    if "[]." in key:
        section, leaf = key.split("[].")
        return f"{section}=[{{path: a}}, {{path: b, {leaf}: {value}}}]", f"{section}[1].{leaf}"
    section, _, leaf = key.rpartition(".")
    if section in WHOLE_SECTIONS:
        return f"{section}={json.dumps({**WHOLE_SECTIONS[section], leaf: value})}", key
    return f"{key}={value}", key


def test_yaml_and_dotted_overrides_resolve(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  d_model: 128\n  n_heads: 4\ntrain:\n  lr: 1e-3\n  schedule: linear\n")
    cfg = load_config(path, ["train.lr=3e-4", "model.n_layers=3", "run.resume=auto", "model.n_kv_heads=null"])
    assert cfg.model.d_model == 128 and cfg.model.n_layers == 3
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.schedule == "linear"
    assert cfg.run.resume == "auto"
    assert cfg.model.n_kv_heads is None and cfg.model.kv_heads == 4
    assert cfg.train.steps == Config().train.steps  # untouched keys keep their defaults


def test_saved_config_loads_back_equal(tmp_path):
    cfg = load_config(CONFIGS / "tiny.yaml", ["train.lr=1e-3"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_checkpoint_async_is_spelled_as_the_docs_say(tmp_path):
    """`async` is a Python keyword: the field is `async_save`, the key either name."""
    assert load_config(None, ["checkpoint.async=true"]).checkpoint.async_save is True
    (tmp_path / "c.yaml").write_text("checkpoint:\n  async: true\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.checkpoint.async_save is True and cfg == load_config(None, ["checkpoint.async_save=true"])


def test_tiny_yaml_spells_out_the_defaults():
    tiny, defaults = load_config(CONFIGS / "tiny.yaml"), Config()
    tiny.run.name, tiny.data.path, tiny.data.val_path = defaults.run.name, defaults.data.path, defaults.data.val_path
    assert tiny == defaults


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown config key train.lrr; did you mean train.lr?"),
        ("modle.d_model=1", "unknown config key modle; did you mean model?"),
        ("train.steps=many", "train.steps must be int, got 'many'"),
        ("train.steps=1.5", "train.steps must be int, got 1.5"),
        ("train.grad_clip=yes", "train.grad_clip must be float, got True"),
        ("train.schedule=step", "train.schedule must be one of cosine, linear, constant, got 'step'"),
        ("parallel.activation_checkpointing=1",
         "parallel.activation_checkpointing must be one of False, True, full, selective, got 1"),
        ("parallel.activation_checkpointing=0",
         "parallel.activation_checkpointing must be one of False, True, full, selective, got 0"),
        ("parallel.zero_stage=true", "parallel.zero_stage must be one of 0, 1, 2, 3, got True"),
        ("model.n_heads=3", "model.d_model must be divisible by model.n_heads (or set model.head_dim)"),
        ("model.head_dim=31", "model.head_dim must be even (RoPE)"),
        ("train.lr", "override 'train.lr' is not of the form key=value"),
    ],
)
def test_bad_keys_and_types_name_the_key(override, message):
    with pytest.raises(BigtrainError) as err:
        load_config(CONFIGS / "tiny.yaml", [override])
    assert str(err.value) == message


def test_missing_config_file(tmp_path):
    with pytest.raises(BigtrainError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_ffn_dim_follows_llama_rule():
    cfg = load_config(CONFIGS / "7b.yaml")
    assert cfg.model.ffn_dim == 11008
    assert Config().model.ffn_dim == 768  # 8/3 · 256 = 682.7, rounded up to a multiple of 256


def test_data_sources_are_a_list_of_typed_entries(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  sources:\n    - {path: web, weight: 3}\n    - path: code\n")
    cfg = load_config(path)
    assert [(s.path, s.weight) for s in cfg.data.sources] == [("web", 3.0), ("code", 1.0)]
    assert isinstance(cfg.data.sources[0].weight, float)
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg
    cfg = load_config(None, ["data.sources=[{path: a, weight: 0.7}, {path: b, weight: 0.3}]"])
    assert [s.weight for s in cfg.data.sources] == [0.7, 0.3]
    assert Config().data.sources == []
    for override, message in [
        ("data.sources=[{path: a, weight: 0.7}, {path: b, weight: heavy}]", "data.sources[1].weight must be float, got 'heavy'"),
        ("data.sources=[{path: a, wieght: 1}]", "unknown config key data.sources[0].wieght; did you mean data.sources[0].weight?"),
        ("data.sources=web", "data.sources must be a list, got 'web'"),
        ("data.sources=[web]", "data.sources[0] must be a mapping, got 'web'"),
        ("data.backend=s3", "data.backend must be one of arrow, streaming, got 's3'"),
    ]:
        with pytest.raises(BigtrainError) as err:
            load_config(None, [override])
        assert str(err.value) == message


def test_the_walk_sees_the_whole_tree():
    assert {"run.seed", "model.n_kv_heads", "data.sources[].weight", "train.lr", "parallel.tp",
            "checkpoint.keep_last", "log.peak_tflops"} <= set(NUMERIC)
    assert "train.deterministic" not in NUMERIC and "parallel.zero_stage" not in NUMERIC  # bool, Literal


def test_every_numeric_key_declares_its_range():
    missing = [key for key, f in NUMERIC.items() if RANGE not in f.metadata]
    assert not missing, f"numeric config keys without a declared range: {missing}"


@pytest.mark.parametrize(
    "key, value",
    [(key, value) for key, f in NUMERIC.items() if RANGE in f.metadata for value in out_of_range_values(f)],
)
def test_out_of_range_values_name_the_key_in_one_line(key, value):
    override, named = as_override(key, value)
    with pytest.raises(BigtrainError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert message.startswith(f"{named}=") and f" must be {NUMERIC[key].metadata[RANGE]}" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr=-0.001", "train.lr=-0.001 must be > 0"),
        ("train.beta1=1", "train.beta1=1.0 must be in [0, 1)"),
        ("train.min_lr_ratio=1.5", "train.min_lr_ratio=1.5 must be in [0, 1]"),
        ("train.grad_clip=0", "train.grad_clip=0.0 must be > 0"),
        ("train.z_loss=-1e-4", "train.z_loss=-0.0001 must be >= 0"),
        ("train.spike_sigma=0", "train.spike_sigma=0.0 must be > 0"),
        ("train.rollback_after=0", "train.rollback_after=0 must be >= 1"),
        ("train.eps=.nan", "train.eps=nan must be > 0"),
        ("checkpoint.keep_last=0", "checkpoint.keep_last=0 must be >= 1"),
        ("data.val_fraction=1", "data.val_fraction=1.0 must be in [0, 1)"),
        ("model.n_heads=0", "model.n_heads=0 must be >= 1"),  # the range comes before d_model % n_heads
        ("run.seed=-1", "run.seed=-1 must be in [0, 4294967295]"),
        ("data.sources=[{path: a, weight: -2}]", "data.sources[0].weight=-2.0 must be > 0"),
    ],
)
def test_range_errors_read_well(override, message):
    with pytest.raises(BigtrainError) as err:
        load_config(None, [override])
    assert str(err.value) == message


def test_bounds_and_unset_optional_keys_are_accepted():
    cfg = load_config(None, [
        "train.lr=1e-30", "train.warmup_steps=0", "train.min_lr_ratio=1", "train.beta1=0", "data.val_fraction=0",
        "run.seed=0", "train.max_minutes=0", "train.spike_window=0", "checkpoint.keep_last=1",
        "train.rollback_after=null", "train.spike_factor=null",
        "train.grad_clip=null", "train.global_batch=null", "log.peak_tflops=null", "model.n_kv_heads=null",
    ])
    assert (cfg.train.lr, cfg.train.grad_clip, cfg.checkpoint.keep_last) == (1e-30, None, 1)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    assert load_config(path).run.name == path.stem


@pytest.mark.parametrize("old, new", [("train.eval_every", "eval.val_every"), ("train.eval_batches", "eval.val_batches")])
def test_a_moved_key_names_its_new_place(tmp_path, old, new):
    with pytest.raises(BigtrainError, match=rf"^config key {old} is now {new}$"):
        load_config(None, [f"{old}=5"])
    section, key = old.split(".")
    (tmp_path / "c.yaml").write_text(f"{section}:\n  {key}: 5\n")
    with pytest.raises(BigtrainError, match=rf"^config key {old} is now {new}$"):
        load_config(tmp_path / "c.yaml")


def test_head_dim_defaults_to_d_model_over_n_heads_and_round_trips(tmp_path):
    cfg = load_config(CONFIGS / "tiny.yaml")
    assert (cfg.model.head_dim, cfg.to_dict()["model"]["head_dim"]) == (64, None)
    cfg.model.d_model = 512  # unset: follows d_model
    assert cfg.model.head_dim == 128
    wide = load_config(CONFIGS / "tiny.yaml", ["model.n_heads=6", "model.n_kv_heads=3", "model.head_dim=64"])
    assert (wide.model.head_dim, wide.to_dict()["model"]["head_dim"]) == (64, 64)  # 256 % 6 != 0 is fine then
    save_config(wide, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml", saved=True) == wide
    (tmp_path / "old.yaml").write_text("model:\n  d_model: 128\n  n_heads: 4\n")  # written before head_dim existed
    assert load_config(tmp_path / "old.yaml", saved=True).model.head_dim == 32


def test_a_checkpoints_config_written_before_a_move_still_loads(tmp_path):
    (tmp_path / "config.yaml").write_text("train:\n  steps: 9\n  eval_every: 7\n  eval_batches: 3\n")
    cfg = load_config(tmp_path / "config.yaml", saved=True)
    assert (cfg.train.steps, cfg.eval.val_every, cfg.eval.val_batches) == (9, 7, 3)


def test_the_replaced_spike_factor_names_its_successors(tmp_path):
    """`train.spike_factor` gave way to the rolling window; a saved config's old value is dropped."""
    with pytest.raises(BigtrainError) as err:
        load_config(None, ["train.spike_factor=2"])
    assert str(err.value).startswith("config key train.spike_factor was replaced by train.spike_window and "
                                     "train.spike_sigma") and "\n" not in str(err.value)
    saved = tmp_path / "config.yaml"
    saved.write_text("train:\n  spike_factor: 2.0\n  lr: 0.001\n")
    assert load_config(saved, saved=True).train.lr == 0.001
    assert "spike_factor" not in load_config(saved, saved=True).to_dict()["train"]


@pytest.mark.parametrize("overrides, message", [
    (["parallel.pp=2", "train.spike_window=8", "train.spike_signals=both"],
     "train.spike_signals=both needs parallel.pp=1 (the pipeline engine updates before the loss is known); "
     "use auto or grad_norm"),
    (["train.rollback_after=3", "train.nonfinite=stop"],
     "train.rollback_after needs train.nonfinite=skip (stop ends the run at the first bad step)"),
])
def test_spike_and_rollback_settings_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(BigtrainError) as err:
        load_config(None, overrides)
    assert str(err.value) == message
    load_config(None, ["parallel.pp=2", "train.spike_window=8"])  # auto: the gradient norm alone
