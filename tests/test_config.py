"""Config composition: every group option composes, and mistakes fail before any work."""

import pytest
from conftest import CONF_DIR, compose_config
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from asif_exp.methods.asif import asif_options, grid_values


def test_default_config_composes_and_resolves(tmp_path):
    cfg = compose_config([], tmp_path)
    assert cfg.encoder.vision.name == "efficientnet_lite0"
    assert cfg.encoder.text.name == "minilm_l6"
    assert cfg.anchors.loader == "synthetic" and cfg.benchmark.loader == "synthetic"
    assert "sweep" not in cfg  # sweep stays out of the defaults list
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["paths"]["data_root"].endswith("data")


GROUPS = [
    "encoder/vision",
    "encoder/text",
    "anchors",
    "benchmark",
    "asif",
    "method",
    "task",
    "logger",
]


@pytest.mark.parametrize(
    "group, option",
    [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))],
)
def test_every_group_option_composes(group, option, tmp_path):
    cfg = compose_config([f"{group}={option}"], tmp_path)
    node = OmegaConf.select(cfg, group.replace("/", "."))
    assert node is not None and "name" in node or group == "asif"


def test_sweep_composes_as_multirun(tmp_path):
    with pytest.raises(ConfigCompositionException, match="sweep"):
        compose_config(["sweep=k_p_n"], tmp_path)  # needs '+': not in the defaults list
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+sweep=k_p_n"], return_hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert set(cfg.hydra.sweeper.params) == {"asif.n", "asif.k", "asif.p"}


@pytest.mark.parametrize(
    "override, error",
    [
        ("asif.kk=3", ConfigCompositionException),  # misspelt key
        ("anchors.num_sampels=3", ConfigCompositionException),
        ("asif.clamp_negative=maybe", ConfigCompositionException),  # wrong type
        ("anchors.num_samples=many", ConfigCompositionException),
        ("benchmark=no_such_benchmark", ConfigCompositionException),
    ],
)
def test_mistakes_fail_at_composition(override, error, tmp_path):
    with pytest.raises(error):
        compose_config([override], tmp_path)


def test_schema_rejects_unknown_keys_in_code(tmp_path):
    cfg = compose_config([], tmp_path)
    with pytest.raises((ConfigAttributeError, ConfigKeyError)):
        cfg.asif.no_such_option = 1


@pytest.mark.parametrize(
    "override, message",
    [
        ("asif.normalize=images", "asif.normalize"),
        ("asif.template_aggregation=median", "template_aggregation"),
        ("asif.k=abc", "asif.k"),
        ("asif.p=[1,x]", "asif.p"),
    ],
)
def test_bad_asif_values_are_clear_errors(override, message, tmp_path):
    cfg = compose_config([override], tmp_path)
    with pytest.raises(ValueError, match=message):
        asif_options(cfg)
        grid_values(cfg, n_available=100)


def test_grid_values_accept_scalars_and_lists(tmp_path):
    cfg = compose_config(["asif.k=[5,10]", "asif.p=3", "asif.n=null"], tmp_path)
    assert grid_values(cfg, n_available=100) == ([100], [5, 10], [3.0])
