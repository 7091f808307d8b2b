"""GenEval-style object checks (Ghosh et al. 2023, arXiv 2310.11513) asked of a VLM judge: the
prompt's GenEval metadata becomes yes/no questions, and the reward is how likely the image passes
them all.

GenEval's metadata (its prompts/evaluation_metadata.jsonl, one object a line; Flow-GRPO trains on
prompts in the same format, its dataset/geneval):

    {"tag": "counting", "include": [{"class": "dog", "count": 2}],
     "exclude": [{"class": "dog", "count": 3}], "prompt": "a photo of two dogs"}

GenEval checks, with an object detector, each `include` item (at least `count` objects of the
class, of `color` when given, placed `position` = [relation, index of another include item]
relative to that one) and each `exclude` item (fewer than `count`); an image is correct when every
item holds. Here each item becomes questions for the VLM (rewards/vlm_judge.py):

    include {"class": "dog", "count": 1}                 "Does the image show a dog?"
    include {"class": "dog", "count": 2}                 "Does the image show at least two dogs?"
      ... and an exclude of three dogs beside it         "Does the image show exactly two dogs?"
    include ... "color": "red" (count 1 / more)          "Is the car red?" / "Are the cars red?"
    include ... "position": ["left of", 0]               "Is the cat left of the dog?"
    exclude {"class": "dog", "count": 3}                 "Does the image show more than two dogs?"
    exclude {"class": "dog", "count": 1}                 "Does the image show a dog?"

A check passes with p = P(yes), or P(no) for an exclude check (its wanted answer is no). The
reward is the product of the checks' p (`combine: product`, the default: all must hold, as
GenEval's correctness) or their mean (partial credit); `correct` in info is GenEval's
correctness read from the judge: every check with p > 0.5. Its mean over a batch is the
GenEval-style accuracy, and `tag` (single_object, two_object, counting, colors, position,
color_attr) splits it by task.

Not GenEval's detector: its Mask2Former object detector and CLIP colour classifier count and place
objects from boxes and masks; a VLM judge answers from the whole image, so these scores are not
GenEval's numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from rewards import RewardError
from rewards.vlm_judge import NO_TOKENS, YES_TOKENS, YesNoJudge, check_combine, combine_probabilities

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
# COCO's class names (GenEval's classes) whose plural is not the regular one
IRREGULAR_PLURALS = {"person": "people", "mouse": "mice", "computer mouse": "computer mice", "knife": "knives",
                     "sheep": "sheep", "skis": "skis", "scissors": "scissors"}


@dataclass(frozen=True)
class Check:
    """One yes/no question and the answer the prompt wants ("yes", or "no" for an exclude item)."""
    question: str
    wanted: str


def plural(name: str) -> str:
    if name in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[name]
    if name.endswith(("s", "x", "z", "ch", "sh")):
        return name + "es"
    if name.endswith("y") and name[-2:-1] not in "aeiou":
        return name[:-1] + "ies"
    return name + "s"


def number(count: int) -> str:
    return NUMBER_WORDS[count] if count < len(NUMBER_WORDS) else str(count)


def objects(count: int, name: str) -> str:
    """'a dog', 'an apple', 'two dogs'."""
    if count == 1:
        return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"
    return f"{number(count)} {plural(name)}"


def _item(prompt: str, key: str, index: int, item: Any) -> tuple[str, int]:
    """An include/exclude item's class and count; a malformed item is a one-line error."""
    where = f"reward 'geneval': prompt '{prompt}': its metadata \"{key}\"[{index}]"
    if not isinstance(item, dict) or not isinstance(item.get("class"), str) or not item["class"].strip():
        raise RewardError(f"{where} must be an object with a \"class\" string, got {item!r}")
    count = item.get("count", 1)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise RewardError(f"{where} must have a \"count\" >= 1, got {count!r}")
    if "color" in item and (not isinstance(item["color"], str) or not item["color"].strip()):
        raise RewardError(f"{where} must have a \"color\" string, got {item['color']!r}")
    return item["class"], count


def geneval_checks(prompt: str, metadata: dict[str, Any]) -> list[Check]:
    """The yes/no checks of a prompt's GenEval metadata, in its order: each include item's count,
    colour and position questions, then each exclude item's (module docstring). A prompt without
    an "include" list is a one-line error naming the prompt and the key."""
    include = metadata.get("include")
    if not isinstance(include, list) or not include:
        reason = "has no \"include\"" if include is None else f"has \"include\" {include!r}, not a non-empty list"
        raise RewardError(f"reward 'geneval': prompt '{prompt}' has no GenEval metadata: its metadata {reason} "
                          "(give a JSON Lines prompts file in GenEval's evaluation_metadata.jsonl format)")
    exclude = metadata.get("exclude", [])
    if not isinstance(exclude, list):
        raise RewardError(f"reward 'geneval': prompt '{prompt}': its metadata \"exclude\" must be a list, got {exclude!r}")
    included = [_item(prompt, "include", i, item) for i, item in enumerate(include)]
    excluded = [_item(prompt, "exclude", i, item) for i, item in enumerate(exclude)]

    checks = []
    for index, ((name, count), item) in enumerate(zip(included, include)):
        if count == 1:
            checks.append(Check(f"Does the image show {objects(1, name)}?", "yes"))
        else:
            # GenEval's counting prompts pair "at least n" with an exclude of n + 1: exactly n
            bound = "exactly" if (name, count + 1) in excluded else "at least"
            checks.append(Check(f"Does the image show {bound} {objects(count, name)}?", "yes"))
        if "color" in item:
            checks.append(Check(f"Is the {name} {item['color']}?" if count == 1
                                else f"Are the {plural(name)} {item['color']}?", "yes"))
        if "position" in item:
            position = item["position"]
            if not (isinstance(position, list) and len(position) == 2 and isinstance(position[0], str)
                    and isinstance(position[1], int) and 0 <= position[1] < len(include) and position[1] != index):
                raise RewardError(f"reward 'geneval': prompt '{prompt}': its metadata \"include\"[{index}] has "
                                  f"\"position\" {position!r}; expected [relation, index of another include item]")
            relation, other = position
            checks.append(Check(f"Is the {name} {relation} the {included[other][0]}?", "yes"))
    for name, count in excluded:
        if count == 1:
            phrase = objects(1, name)
        else:
            phrase = f"more than {'one ' + name if count == 2 else objects(count - 1, name)}"
        checks.append(Check(f"Does the image show {phrase}?", "no"))
    return checks


class GenEval:
    """r = product (or mean, `combine`) over the prompt's GenEval checks of p = P(yes), or P(no)
    for an exclude check; info: `correct` (every check with p > 0.5: GenEval's correctness as the
    judge sees it), `tag`, `checks_passed` (the fraction with p > 0.5), `check_p` (each check's p,
    in `geneval_checks` order) and the `answer` ("3/4 checks").

    Every prompt needs GenEval metadata (a JSON Lines prompts file in GenEval's format, such as
    its evaluation_metadata.jsonl as published). The VLM params are `vlm_judge`'s: `model`,
    `backend`, `prompt_template` ({question}), `yes_tokens`/`no_tokens`, `normalize`, `logprobs`
    (vLLM's top-k: a yes or no token outside it counts as p = 0), `batch_size`, `device`, `dtype`
    and the vLLM settings.
    """

    def __init__(self, model: str = "llava-hf/llava-1.5-7b-hf", backend: str = "transformers",
                 combine: str = "product", prompt_template: str = "USER: <image>\n{question} ASSISTANT:",
                 yes_tokens: Sequence[str] = YES_TOKENS, no_tokens: Sequence[str] = NO_TOKENS,
                 normalize: bool = True, logprobs: int = 20, batch_size: int = 16, device: str = "auto",
                 dtype: str = "auto", gpu_memory_utilization: float = 0.9, max_model_len: int | None = None,
                 limit_mm_per_prompt: dict[str, int] | None = None, tensor_parallel_size: int = 1,
                 vllm_engine_args: dict[str, Any] | None = None):
        check_combine(combine)
        self.combine = combine
        self.judge = YesNoJudge(model, backend, prompt_template, yes_tokens, no_tokens, normalize, logprobs,
                                batch_size, device, dtype, gpu_memory_utilization, max_model_len,
                                limit_mm_per_prompt, tensor_parallel_size, vllm_engine_args)

    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict]) -> tuple[np.ndarray, dict]:
        checks = [geneval_checks(prompt, fields) for prompt, fields in zip(prompts, metadata)]
        # every (image, check) pair in one call to the judge, image-major
        pil_images = [Image.fromarray(image) for image in images]
        p_yes, p_no = self.judge.probabilities([pil_images[i] for i, image_checks in enumerate(checks)
                                                for _ in image_checks],
                                               [check.question for image_checks in checks for check in image_checks])
        rewards, info = [], {"answer": [], "correct": [], "checks_passed": [], "check_p": [], "tag": []}
        start = 0
        for image_checks, fields in zip(checks, metadata):
            end = start + len(image_checks)
            p = np.array([y if check.wanted == "yes" else n
                          for check, y, n in zip(image_checks, p_yes[start:end], p_no[start:end])])
            start = end
            rewards.append(combine_probabilities(p[None], self.combine)[0])
            passed = int((p > 0.5).sum())
            info["answer"].append(f"{passed}/{len(p)} checks")
            info["correct"].append(passed == len(p))
            info["checks_passed"].append(passed / len(p))
            info["check_p"].append(p.tolist())
            info["tag"].append(str(fields.get("tag", "")))
        return np.array(rewards), info

