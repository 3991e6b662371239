from pathlib import Path

import pytest

from bigtrain.config import Config, load_config, save_config
from bigtrain.errors import BigtrainError

CONFIGS = Path(__file__).parents[2] / "configs"


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
        ("model.n_heads=3", "model.d_model must be divisible by model.n_heads"),
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
