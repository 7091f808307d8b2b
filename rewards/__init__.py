"""Reward functions and their registry.

A reward is `fn(images, prompts, metadata) -> (rewards, info)`: images uint8 [B, H, W, 3],
prompts a list of B strings, metadata a list of B dicts (batch_id, seed, policy_version, and the
prompt's own fields from a JSON Lines prompts file); rewards a float array [B], info a dict
of per-sample extras (lists of length B; an `answer` entry, such as a VLM's answer, is shown
under each sample in the sample grids). A reward of videos says so with an attribute
`medium = "video"` on the function or class, and gets frames uint8 [B, F, H, W, 3] instead
(`ddpo.media.Media`). An image reward on a video model scores every frame, and a clip's reward
is its frames' mean or min (`reward.frame_reduction`, `compute_reward`); a video reward on an
image model is an error.

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
import numbers
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
    "digit_motion": "rewards.digits:DigitMotion",
    "hpsv2": "rewards.hpsv2:HPSv2",
    "image_reward": "rewards.image_reward:ImageReward",
    "ocr": "rewards.ocr:OCRReward",
    "vlm_judge": "rewards.vlm_judge:VLMJudge",
    "geneval": "rewards.geneval:GenEval",
    "temporal_consistency": "rewards.temporal:TemporalConsistency",
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
                   metadata: list[dict[str, Any]],
                   frame_reduction: str = "mean") -> tuple[np.ndarray, dict[str, list]]:
    """Call a reward on the samples' images or frames, as it declares, and check what it returns:
    never a silent zero for a broken reward. An image reward on videos scores every frame
    (`score_frames`), each clip's reward the `frame_reduction` ("mean" or "min") of its frames'."""
    medium = reward_medium(fn)
    if medium == "video" and media.medium == "image":
        raise RewardError(f"reward '{name}' scores videos, and the model makes images: "
                          "choose a reward of images")
    if medium == "image" and media.medium == "video":
        return score_frames(name, fn, media, prompts, metadata, frame_reduction)
    return _call(name, fn, media.images if medium == "image" else media.frames, prompts, metadata, "samples")


def _call(name: str, fn: RewardFn, inputs: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]],
          what: str) -> tuple[np.ndarray, dict[str, list]]:
    """`fn` on B `inputs` (images, or clips' frames), its rewards [B] and info checked; `what`
    names the inputs in the errors (samples, frames)."""
    try:
        rewards, info = fn(inputs, prompts, metadata)
    except (RewardError, RewardProcessDead):  # already named; a dead process restarts its actor
        raise
    except Exception as err:
        raise RewardError(f"reward '{name}' raised {type(err).__name__}: {err}") from err
    rewards = np.asarray(rewards, dtype=np.float32).reshape(-1)
    if rewards.shape[0] != len(inputs):
        raise RewardError(f"reward '{name}' returned {rewards.shape[0]} rewards for {len(inputs)} {what}")
    if not np.all(np.isfinite(rewards)):
        raise RewardError(f"reward '{name}' returned NaN or infinite rewards")
    info = dict(info or {})
    for key, values in info.items():
        if len(values) != len(inputs):
            raise RewardError(f"reward '{name}' returned info '{key}' of length {len(values)} "
                              f"for {len(inputs)} {what}")
    return rewards, info


FRAME_REDUCTIONS = {"mean": np.mean, "min": np.min}


def score_frames(name: str, fn: RewardFn, media: Media, prompts: list[str], metadata: list[dict[str, Any]],
                 frame_reduction: str = "mean") -> tuple[np.ndarray, dict[str, list]]:
    """An image reward on B clips of F frames: one call on the B*F frames, each with its clip's
    prompt and metadata (plus `frame`, the frame's index); a clip's reward is the mean or min of
    its frames' (`frame_reduction`). Its info comes back per clip: a numeric entry (numbers,
    bools) as the mean over the frames (a judge's `correct` the fraction of frames judged
    correct), any other (an `answer`) as the value at the clip's lowest-scoring frame, the one
    that decides a `min` and shows a `mean`'s worst."""
    if frame_reduction not in FRAME_REDUCTIONS:
        raise RewardError(f"reward.frame_reduction: must be one of {sorted(FRAME_REDUCTIONS)}, got {frame_reduction!r}")
    count, num_frames = media.frames.shape[:2]
    frames = media.frames.reshape(count * num_frames, *media.frames.shape[2:])  # clip-major: clip b's frames together
    frame_prompts = [prompt for prompt in prompts for _ in range(num_frames)]
    frame_metadata = [{**row, "frame": f} for row in metadata for f in range(num_frames)]
    rewards, info = _call(name, fn, frames, frame_prompts, frame_metadata, "frames")
    rewards = rewards.reshape(count, num_frames)
    worst = rewards.argmin(axis=1)  # each clip's lowest-scoring frame
    return FRAME_REDUCTIONS[frame_reduction](rewards, axis=1), {
        key: _per_clip(values, count, num_frames, worst) for key, values in info.items()}


def _per_clip(values: list, count: int, num_frames: int, worst: np.ndarray) -> list:
    """One info entry's B*F per-frame values as B per-clip ones (see `score_frames`)."""
    if all(isinstance(v, (numbers.Real, np.bool_)) for v in values):  # bool and numpy's numbers are Real
        return np.asarray(values, np.float64).reshape(count, num_frames).mean(axis=1).tolist()
    return [values[clip * num_frames + frame] for clip, frame in enumerate(worst.tolist())]
