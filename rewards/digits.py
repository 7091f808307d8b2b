"""The digit judges: small classifiers trained on scikit-learn's handwritten digits, as rewards.

r(x_0, c) = p_judge(digit named in c | x_0), the judge's probability of the prompted digit.
Images of any size are read as the judges were trained: grey, ink dark on light, area-resized to
the dataset's 8x8. `digit_judge` is a small CNN. `digit_judge_2`, the held-out reward that guards
against reward hacking, is a nearest-neighbour judge with a "none" answer: a shape far from every
training digit (a blob the CNN still calls a four) gets little probability for any digit. Both
were fitted on the same split, never on its held-out digits. `scripts/train_digits.py` fits them
(and the `builtin:digits` models).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_model

from rewards import RewardError

JUDGE_DIR = Path(__file__).resolve().parent.parent / "ddpo" / "assets" / "digits-judge"
JUDGE_2_DIR = JUDGE_DIR.with_name("digits-judge-2")
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_DIGIT_PATTERN = re.compile(r"\b(" + "|".join(DIGIT_WORDS) + r"|[0-9])\b", re.IGNORECASE)


def prompted_digit(prompt: str, reward: str = "digit_judge") -> int:
    """The one digit a prompt names, as a word ("seven") or a numeral ("7"); errors name `reward`."""
    found = {m.lower() for m in _DIGIT_PATTERN.findall(prompt)}
    digits = {int(m) if m.isdigit() else DIGIT_WORDS.index(m) for m in found}
    if len(digits) != 1:
        raise RewardError(f"reward '{reward}': the prompt '{prompt}' names "
                          f"{'no digit' if not digits else 'several digits'} (zero..nine or 0..9)")
    return digits.pop()


def render_digits(pixels: np.ndarray, size: int) -> np.ndarray:
    """sklearn's digits (rows of 64 values in 0..16) -> uint8 RGB images [N, size, size, 3]:
    dark ink on white, bilinearly upsampled."""
    ink = torch.as_tensor(pixels, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    ink = F.interpolate(ink, size=(size, size), mode="bilinear", align_corners=False)
    grey = ((1.0 - ink.clamp(0, 1)) * 255).round().to(torch.uint8)
    return grey.permute(0, 2, 3, 1).expand(-1, -1, -1, 3).numpy().copy()


def judge_input(images: np.ndarray) -> torch.Tensor:
    """uint8 images [B, H, W, 3] -> ink in [0, 1] as [B, 1, 8, 8]: grey, inverted, area-resized."""
    grey = torch.as_tensor(np.asarray(images), dtype=torch.float32).mean(dim=-1) / 255.0
    return F.interpolate((1.0 - grey)[:, None], size=(8, 8), mode="area")


def load_heldout() -> tuple[np.ndarray, np.ndarray]:
    """The judges' held-out digits (never trained on by the judges or the models), as
    scripts/train_digits.py split them off: (pixels [N, 64] in 0..16, labels [N])."""
    with np.load(JUDGE_DIR / "heldout.npz") as heldout:
        return heldout["x"], heldout["y"]


class DigitClassifier(torch.nn.Sequential):
    """Two 3x3 convolutions on the 8x8 ink, a 2x2 max-pool, then a two-layer head (10 logits)."""

    def __init__(self, channels: tuple[int, int] = (16, 32), hidden: int = 64):
        c1, c2 = channels
        super().__init__(
            torch.nn.Conv2d(1, c1, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(c1, c2, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(c2 * 16, hidden), torch.nn.ReLU(),
            torch.nn.Linear(hidden, 10),
        )


class DigitNeighbours(torch.nn.Module):
    """Judge 2's: the training digits themselves, and a distance beyond which a shape is no digit.

        d_c(x) = min_{i: y_i = c} ||x - x_i||^2        (x: the 64 ink values)
        p(c | x) = softmax_c(-d_0, ..., -d_9, -d_none) / T

    with d_none the `reject_distance`: eleven logits, the last "unlike any digit". A classifier
    trained to tell digits apart says "four" with confidence for shapes far from every four it saw;
    this one cannot: its probabilities fall as a shape leaves the training digits behind."""

    def __init__(self, num_prototypes: int):
        super().__init__()
        self.register_buffer("prototypes", torch.zeros(num_prototypes, 64))
        self.register_buffer("labels", torch.zeros(num_prototypes, dtype=torch.long))
        self.register_buffer("temperature", torch.ones(()))
        self.register_buffer("reject_distance", torch.ones(()))

    def class_distances(self, ink: torch.Tensor) -> torch.Tensor:
        """d_c for each image [B, 1, 8, 8] and digit: [B, 10]."""
        squared = (ink.flatten(1)[:, None, :] - self.prototypes[None]).square().sum(-1)  # [B, N]
        return torch.stack([squared[:, self.labels == c].min(dim=1).values for c in range(10)], dim=1)

    def forward(self, ink: torch.Tensor) -> torch.Tensor:
        distances = self.class_distances(ink)
        reject = self.reject_distance.expand(len(distances), 1)
        return -torch.cat([distances, reject], dim=1) / self.temperature


def build_classifier(config: dict, folder: Path) -> torch.nn.Module:
    """The empty classifier a judge folder's config.json describes: its `architecture`, "cnn"
    (judge 1, whose config.json predates the key) or "nearest_neighbour"."""
    architecture = config.get("architecture", "cnn")
    if architecture == "cnn":
        return DigitClassifier(tuple(config["channels"]), config["hidden"])
    if architecture == "nearest_neighbour":
        return DigitNeighbours(config["num_prototypes"])
    raise RewardError(f"{folder / 'config.json'}: unknown architecture '{architecture}' (cnn or nearest_neighbour)")


def load_judge(path: str | Path | None = None) -> tuple[torch.nn.Module, dict]:
    """The classifier (eval mode) and its config.json from a judge folder (None: judge 1's)."""
    folder = Path(path) if path is not None else JUDGE_DIR
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise RewardError(f"reward.params.path: '{folder}' is not a digit judge folder "
                          "(config.json and model.safetensors expected)")
    config = json.loads((folder / "config.json").read_text())
    model = build_classifier(config, folder)
    load_model(model, str(folder / "model.safetensors"))
    return model.eval(), config


class DigitJudge:
    """Reward: the judge's probability of the prompted digit. info: `answer`, the judged digit
    ("none": unlike any, judge 2's), and `correct`, 1.0 where it is the prompted one."""

    name, folder = "digit_judge", JUDGE_DIR

    def __init__(self, path: str | None = None, device: str = "cpu"):
        self.device = torch.device(device)
        self.model, self.config = load_judge(path if path is not None else self.folder)
        self.model.to(self.device)

    @torch.no_grad()
    def probabilities(self, images: np.ndarray) -> torch.Tensor:
        """p_judge(digit | image), [B, 10]."""
        return torch.softmax(self.model(judge_input(images).to(self.device)), dim=-1).cpu()

    def __call__(self, images, prompts, metadata):
        target = torch.tensor([prompted_digit(p, self.name) for p in prompts])
        probs = self.probabilities(images)
        answer = probs.argmax(dim=-1)
        reward = probs[torch.arange(len(target)), target]
        return reward.numpy(), {"answer": [str(int(a)) if a < 10 else "none" for a in answer],
                                "correct": (answer == target).float().tolist()}


class DigitJudge2(DigitJudge):
    """The second judge (nearest neighbours with a "none" answer, `digits-judge-2/`) as the same
    reward: the held-out reward to watch beside the trained one. Its reward falling while DDPO
    raises digit_judge's is reward hacking: shapes that fool the CNN but are like no digit."""

    name, folder = "digit_judge_2", JUDGE_2_DIR
