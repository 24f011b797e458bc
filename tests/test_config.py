import pytest

from moevision import config as C
from moevision.errors import ConfigError
from moevision.recipes import get_recipe, list_recipes


def test_set_by_path_converts_types():
    cfg = get_recipe("fmnist_moe")
    C.set_by_path(cfg, "model.num_experts", "8")
    C.set_by_path(cfg, "model.capacity_factor", "none")
    C.set_by_path(cfg, "model.moe_layers", "[0, 2]")
    C.set_by_path(cfg, "train.lr", "1e-3")
    C.set_by_path(cfg, "train.amp", "true")
    C.set_by_path(cfg, "data.train_subset", "1000")
    assert cfg.model.num_experts == 8 and cfg.model.capacity_factor is None
    assert cfg.model.moe_layers == [0, 2] and cfg.train.lr == 1e-3 and cfg.train.amp is True
    C.set_by_path(cfg, "model.moe_layers", "every_2")
    assert cfg.model.moe_layers == "every_2"
    C.validate_config(cfg)


@pytest.mark.parametrize("key,value,match", [
    ("model.num_expertz", "4", "unknown config key"),
    ("nope.x", "1", "unknown config key"),
    ("model.num_experts", "four", "not a valid int"),
    ("train.lr", "fast", "not a valid float"),
    ("train.amp", "maybe", "not a valid bool"),
    ("model", "1", "section"),
])
def test_set_by_path_errors_name_key_and_value(key, value, match):
    with pytest.raises(ConfigError, match=match):
        C.set_by_path(get_recipe("fmnist_moe"), key, value)


@pytest.mark.parametrize("key,value", [("model.num_experts", "0"), ("train.epochs", "0"), ("train.lr", "-1"),
                                       ("model.top_k", "9"), ("data.augment", "mixup9"),
                                       ("model.capacity_factor", "0"), ("model.router", "magic")])
def test_validation_names_field(key, value):
    cfg = get_recipe("fmnist_moe")
    C.set_by_path(cfg, key, value)
    with pytest.raises(ConfigError, match=key.split(".")[1]):
        C.validate_config(cfg)


def test_recipes_build_and_validate():
    assert {"fmnist_moe", "fmnist_dense", "smoke_synthetic"} <= set(list_recipes())
    for name in list_recipes():
        cfg = get_recipe(name)
        C.validate_config(cfg)
        assert cfg.recipe == name
    with pytest.raises(ConfigError, match="unknown recipe"):
        get_recipe("nope")


def test_dense_twin_has_same_active_params():
    from moevision.train.engine import build_model

    moe, dense = build_model(get_recipe("fmnist_moe")), build_model(get_recipe("fmnist_dense"))
    routers = sum(p.numel() for n, p in moe.named_parameters() if "router" in n)
    assert moe.num_active_params() == dense.num_params() + routers
