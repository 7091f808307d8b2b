"""Reward functions and their registry.

A reward is `fn(images, prompts, metadata) -> (rewards, info)`: images uint8 [B, H, W, 3],
prompts a list of B strings, metadata a list of B dicts; rewards a float array [B], info a dict
of per-image extras (lists of length B). Registered names are below; any other reward is given
as a `module:function` path.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import numpy as np

from rewards.jpeg import jpeg_compressibility, jpeg_incompressibility

RewardFn = Callable[[np.ndarray, list[str], list[dict[str, Any]]], tuple[np.ndarray, dict[str, list]]]

REGISTRY: dict[str, RewardFn] = {
    "jpeg_compressibility": jpeg_compressibility,
    "jpeg_incompressibility": jpeg_incompressibility,
}


class RewardError(RuntimeError):
    """A reward could not be found or returned something unusable; the message names it."""


def load_reward(name: str) -> RewardFn:
    """A registered reward by name, or a user function by `module:function`."""
    if name in REGISTRY:
        return REGISTRY[name]
    if ":" not in name:
        raise RewardError(
            f"reward.name: unknown reward '{name}'; choose one of {sorted(REGISTRY)} "
            "or give a 'module:function' path"
        )
    module_name, function_name = name.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise RewardError(f"reward.name: cannot import module '{module_name}' ({err})") from None
    fn = getattr(module, function_name, None)
    if not callable(fn):
        raise RewardError(f"reward.name: module '{module_name}' has no function '{function_name}'")
    return fn


def compute_reward(name: str, fn: RewardFn, images: np.ndarray, prompts: list[str],
                   metadata: list[dict[str, Any]]) -> tuple[np.ndarray, dict[str, list]]:
    """Call a reward and check what it returns: never a silent zero for a broken reward."""
    try:
        rewards, info = fn(images, prompts, metadata)
    except Exception as err:
        raise RewardError(f"reward '{name}' raised {type(err).__name__}: {err}") from err
    rewards = np.asarray(rewards, dtype=np.float32).reshape(-1)
    if rewards.shape[0] != len(images):
        raise RewardError(f"reward '{name}' returned {rewards.shape[0]} rewards for {len(images)} images")
    if not np.all(np.isfinite(rewards)):
        raise RewardError(f"reward '{name}' returned NaN or infinite rewards")
    info = dict(info or {})
    for key, values in info.items():
        if len(values) != len(images):
            raise RewardError(f"reward '{name}' returned info '{key}' of length {len(values)} "
                              f"for {len(images)} images")
    return rewards, info
