"""The digit judge: a small CNN trained on scikit-learn's handwritten digits, as a reward.

r(x_0, c) = p_judge(digit named in c | x_0), the judge's probability of the prompted digit.
Images of any size are read as the judge was trained: grey, ink dark on light, area-resized to
the dataset's 8x8. `scripts/train_digits.py` trains it (and the `builtin:digits` model).
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
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_DIGIT_PATTERN = re.compile(r"\b(" + "|".join(DIGIT_WORDS) + r"|[0-9])\b", re.IGNORECASE)


def prompted_digit(prompt: str) -> int:
    """The one digit a prompt names, as a word ("seven") or a numeral ("7")."""
    found = {m.lower() for m in _DIGIT_PATTERN.findall(prompt)}
    digits = {int(m) if m.isdigit() else DIGIT_WORDS.index(m) for m in found}
    if len(digits) != 1:
        raise RewardError(f"reward 'digit_judge': the prompt '{prompt}' names "
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
    """The judge's held-out digits (never trained on by the judge or the models), as
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


def load_judge(path: str | Path | None = None) -> tuple[DigitClassifier, dict]:
    """The classifier (eval mode) and its config.json from a judge folder (None: the embedded one)."""
    folder = Path(path) if path is not None else JUDGE_DIR
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise RewardError(f"reward.params.path: '{folder}' is not a digit judge folder "
                          "(config.json and model.safetensors expected)")
    config = json.loads((folder / "config.json").read_text())
    model = DigitClassifier(tuple(config["channels"]), config["hidden"])
    load_model(model, str(folder / "model.safetensors"))
    return model.eval(), config


class DigitJudge:
    """Reward: the judge's probability of the prompted digit. info: `answer`, the judged digit,
    and `correct`, 1.0 where it is the prompted one."""

    def __init__(self, path: str | None = None, device: str = "cpu"):
        self.device = torch.device(device)
        self.model, self.config = load_judge(path)
        self.model.to(self.device)

    @torch.no_grad()
    def probabilities(self, images: np.ndarray) -> torch.Tensor:
        """p_judge(digit | image), [B, 10]."""
        return torch.softmax(self.model(judge_input(images).to(self.device)), dim=-1).cpu()

    def __call__(self, images, prompts, metadata):
        target = torch.tensor([prompted_digit(p) for p in prompts])
        probs = self.probabilities(images)
        answer = probs.argmax(dim=-1)
        reward = probs[torch.arange(len(target)), target]
        return reward.numpy(), {"answer": [str(int(a)) for a in answer],
                                "correct": (answer == target).float().tolist()}
