"""Reward functions and their registry.

A reward is `fn(images, prompts, metadata) -> (rewards, info)`: images uint8 [B, H, W, 3],
prompts a list of B strings, metadata a list of B dicts (batch_id, seed, policy_version, and the
prompt's own fields from a JSON Lines prompts file); rewards a float array [B], info a dict
of per-sample extras (lists of length B; an `answer` entry, such as a VLM's answer, is shown
under each sample in the sample grids). A reward of videos says so with an attribute
`medium = "video"` on the function or class, and gets frames uint8 [B, F, H, W, 3] instead
(`ddpo.media.Media`): a reward scores the medium it declares, and no other.

A reward is named in the config by a registered name (below) or a `module:attr` path, with
keyword arguments `reward.params`:
- a function is called as `fn(images, prompts, metadata, **params)`;
- a class is built once per reward actor as `cls(**params)` (load models in `__init__`) and the
  instance is called as `reward(images, prompts, metadata)`.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any, Callable

import numpy as np

from ddpo.errors import RewardError
from ddpo.media import Media

RewardFn = Callable[[np.ndarray, list[str], list[dict[str, Any]]], tuple[np.ndarray, dict[str, list]]]

# name -> "module:attr", imported only when used (the model rewards pull in transformers)
REGISTRY: dict[str, str] = {
    "jpeg_compressibility": "rewards.jpeg:jpeg_compressibility",
    "jpeg_incompressibility": "rewards.jpeg:jpeg_incompressibility",
    "prompt_alignment": "rewards.alignment:PromptAlignment",
    "aesthetic": "rewards.aesthetic:AestheticScore",
    "pickscore": "rewards.pickscore:PickScore",
    "digit_judge": "rewards.digits:DigitJudge",
    "digit_judge_2": "rewards.digits:DigitJudge2",
    "hpsv2": "rewards.hpsv2:HPSv2",
    "image_reward": "rewards.image_reward:ImageReward",
    "ocr": "rewards.ocr:OCRReward",
    "vlm_judge": "rewards.vlm_judge:VLMJudge",
    "geneval": "rewards.geneval:GenEval",
}


class RewardProcessDead(RuntimeError):
    """The reward's process can no longer score (e.g. its vLLM engine died): the reward actor
    exits so that Ray restarts it and reruns the call, instead of retrying a dead engine."""


def resolve_reward(name: str, field: str = "reward") -> Any:
    """The function or class behind a registered name or a `module:attr` path; errors name the
    config `field` it came from (`reward`, or `reward.weighted[i]`)."""
    path = REGISTRY.get(name, name)
    if ":" not in path:
        raise RewardError(
            f"{field}.name: unknown reward '{name}'; choose one of {sorted(REGISTRY)} "
            "or give a 'module:function' path"
        )
    module_name, attr = path.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise RewardError(f"{field}.name: cannot import module '{module_name}' ({err})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"{field}.name: module '{module_name}' has no function '{attr}'")
    return fn


def check_reward(name: str, params: dict[str, Any] | None = None, field: str = "reward") -> Any:
    """The reward behind `name`, checked to take `params`, without building it (no model loads)."""
    fn = resolve_reward(name, field)
    call_args = () if inspect.isclass(fn) else (None, None, None)  # (images, prompts, metadata)
    try:
        inspect.signature(fn).bind_partial(*call_args, **(params or {}))
    except TypeError as err:
        raise RewardError(f"{field}.params: '{name}' does not take these params ({err})") from None
    return fn


def check_rewards(reward) -> None:
    """Every term of a `RewardConfig` checked as `check_reward` does, errors naming its field."""
    for i, term in enumerate(reward.terms()):
        check_reward(term.name, term.params, f"reward.weighted[{i}]" if reward.weighted else "reward")


def load_reward(name: str, params: dict[str, Any] | None = None) -> RewardFn:
    """A ready-to-call reward: the class built with `params`, or the function with them bound."""
    fn, params = check_reward(name, params), dict(params or {})
    if inspect.isclass(fn):
        return fn(**params)
    return functools.partial(fn, **params) if params else fn


def reward_medium(fn: RewardFn) -> str:
    """The medium a reward scores: its `medium` attribute (a function's, a class's), else image."""
    return getattr(getattr(fn, "func", fn), "medium", "image")  # `func`: a functools.partial's


def compute_reward(name: str, fn: RewardFn, media: Media, prompts: list[str],
                   metadata: list[dict[str, Any]]) -> tuple[np.ndarray, dict[str, list]]:
    """Call a reward on the samples' images or frames, as it declares, and check what it returns:
    never a silent zero for a broken reward."""
    medium = reward_medium(fn)
    if medium != media.medium:
        raise RewardError(f"reward '{name}' scores {medium}s, and the model makes {media.medium}s: "
                          f"choose a reward of {media.medium}s")
    try:
        rewards, info = fn(media.images if medium == "image" else media.frames, prompts, metadata)
    except (RewardError, RewardProcessDead):  # already named; a dead process restarts its actor
        raise
    except Exception as err:
        raise RewardError(f"reward '{name}' raised {type(err).__name__}: {err}") from err
    rewards = np.asarray(rewards, dtype=np.float32).reshape(-1)
    if rewards.shape[0] != len(media):
        raise RewardError(f"reward '{name}' returned {rewards.shape[0]} rewards for {len(media)} samples")
    if not np.all(np.isfinite(rewards)):
        raise RewardError(f"reward '{name}' returned NaN or infinite rewards")
    info = dict(info or {})
    for key, values in info.items():
        if len(values) != len(media):
            raise RewardError(f"reward '{name}' returned info '{key}' of length {len(values)} "
                              f"for {len(media)} samples")
    return rewards, info
