"""Recipes: named functions returning a complete ``RunConfig``. Each docstring states the result it
reaches, the time it takes and the hardware that was measured on (vmoe ``configs/`` style)."""

from __future__ import annotations

from typing import Callable

from ..errors import ConfigError
from ..models import create_model
from ..train.run_config import DataConfig, RunConfig, TrainConfig

_RECIPES: dict[str, Callable[[], RunConfig]] = {}
DEFAULT_RECIPE = "fmnist_moe"


def register_recipe(fn: Callable[[], RunConfig]) -> Callable[[], RunConfig]:
    _RECIPES[fn.__name__] = fn
    return fn


def list_recipes() -> list[str]:
    return sorted(_RECIPES)


def recipe_doc(name: str) -> str:
    return (_RECIPES[name].__doc__ or "").strip()


def get_recipe(name: str) -> RunConfig:
    if name not in _RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; known recipes: {', '.join(list_recipes())}")
    cfg = _RECIPES[name]()
    cfg.recipe = name
    return cfg


def _model_config(model_name: str):
    return create_model(model_name).config  # the registered defaults, as a full ViTConfig


@register_recipe
def fmnist_moe() -> RunConfig:
    """The main job: MoE hybrid ViT (conv stem -> 7x7 tokens, d=96, 4 blocks, E=4 top-1 experts in
    blocks 1 and 3, capacity 1.25 train / 2.0 eval) on the full Fashion-MNIST training set.

    Measured: see docs/results/main_job.md (filled by `moevision train`); expected >= 90% test accuracy
    in under 10 minutes on 2 CPU cores (torch 2.13 CPU, fp32).
    """
    return RunConfig(model_name="moe_vit_fmnist_hybrid", model=_model_config("moe_vit_fmnist_hybrid"),
                     data=DataConfig(dataset="fashion_mnist", augment="flip", batch_size=64),
                     train=TrainConfig(epochs=5, lr=1e-3, warmup_epochs=0.3, weight_decay=0.05,
                                       label_smoothing=0.1, grad_clip=1.0))


@register_recipe
def fmnist_dense() -> RunConfig:
    """Dense twin of ``fmnist_moe``: the same hybrid ViT with a dense MLP in every block (the same
    active parameters per token, minus the routers), same data, schedule and epochs."""
    cfg = fmnist_moe()
    cfg.model_name = "vit_fmnist_hybrid"
    cfg.model = _model_config("vit_fmnist_hybrid")
    return cfg


@register_recipe
def smoke_synthetic() -> RunConfig:
    """A seconds-long run on the synthetic data set with the tiny MoE ViT (tests and CI smoke).
    Reaches > 90% on the synthetic test split in about 5 s on 2 CPU cores."""
    return RunConfig(model_name="moe_vit_tiny_test", model=_model_config("moe_vit_tiny_test"),
                     data=DataConfig(dataset="synthetic", augment="none", batch_size=32, eval_batch_size=128),
                     train=TrainConfig(epochs=3, lr=3e-3, warmup_epochs=0.2, log_every=5, checkpoint_every=10,
                                       label_smoothing=0.0))
