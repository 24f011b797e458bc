"""Step hooks: how techniques act during training without branches in the training loop.

A technique registers a factory ``(cfg, model) -> list[hook]``; each hook is called as
``hook(model, step, total_steps)`` after every optimiser step. Factories return [] when their technique
is disabled in the config.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch


class StepHook(Protocol):
    def __call__(self, model: torch.nn.Module, step: int, total_steps: int) -> None: ...


HookFactory = Callable[..., list]
_FACTORIES: dict[str, HookFactory] = {}


def register_hook_factory(name: str, factory: HookFactory) -> None:
    _FACTORIES[name] = factory


def build_step_hooks(cfg, model: torch.nn.Module) -> list[StepHook]:
    from .. import techniques  # noqa: F401  (registers the techniques' factories)

    hooks: list[StepHook] = []
    for factory in _FACTORIES.values():
        hooks.extend(factory(cfg, model))
    return hooks
