"""The digit judges: small classifiers trained on scikit-learn's handwritten digits, as rewards.

r(x_0, c) = p_judge(digit named in c | x_0), the judge's probability of the prompted digit.
Images of any size are read as the judges were trained: grey, ink dark on light, area-resized to
the dataset's 8x8. `digit_judge` is a small CNN. `digit_judge_2`, the held-out reward that guards
against reward hacking, is a nearest-neighbour judge with a "none" answer: a shape far from every
training digit (a blob the CNN still calls a four) gets little probability for any digit. Both
were fitted on the same split, never on its held-out digits. `scripts/train_digits.py` fits them
(and the `builtin:digits` models).

`digit_motion` scores clips of a digit that moves (`builtin:digits-video`): judge 1 on each frame,
times a check that the digit's ink moved the prompted way (left, right, up or down).
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
# a clip's directions as (row, column) unit vectors: image rows grow downwards
DIRECTIONS = {"left": (0.0, -1.0), "right": (0.0, 1.0), "up": (-1.0, 0.0), "down": (1.0, 0.0)}
_DIRECTION_PATTERN = re.compile(r"\b(" + "|".join(DIRECTIONS) + r")\b", re.IGNORECASE)


def prompted_digit(prompt: str, reward: str = "digit_judge") -> int:
    """The one digit a prompt names, as a word ("seven") or a numeral ("7"); errors name `reward`."""
    found = {m.lower() for m in _DIGIT_PATTERN.findall(prompt)}
    digits = {int(m) if m.isdigit() else DIGIT_WORDS.index(m) for m in found}
    if len(digits) != 1:
        raise RewardError(f"reward '{reward}': the prompt '{prompt}' names "
                          f"{'no digit' if not digits else 'several digits'} (zero..nine or 0..9)")
    return digits.pop()


def prompted_direction(prompt: str, reward: str = "digit_motion") -> str:
    """The one direction a prompt names (left, right, up or down); errors name `reward`."""
    found = {m.lower() for m in _DIRECTION_PATTERN.findall(prompt)}
    if len(found) != 1:
        raise RewardError(f"reward '{reward}': the prompt '{prompt}' names "
                          f"{'no direction' if not found else 'several directions'} (left, right, up or down)")
    return found.pop()


def render_digits(pixels: np.ndarray, size: int) -> np.ndarray:
    """sklearn's digits (rows of 64 values in 0..16) -> uint8 RGB images [N, size, size, 3]:
    dark ink on white, bilinearly upsampled."""
    ink = torch.as_tensor(pixels, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    ink = F.interpolate(ink, size=(size, size), mode="bilinear", align_corners=False)
    grey = ((1.0 - ink.clamp(0, 1)) * 255).round().to(torch.uint8)
    return grey.permute(0, 2, 3, 1).expand(-1, -1, -1, 3).numpy().copy()


def digit_clips(pixels: np.ndarray, directions: list[str], speeds: np.ndarray, num_frames: int, size: int,
                rng: np.random.Generator, spread: int | None = None) -> np.ndarray:
    """sklearn's digits (rows of 64 values in 0..16) as clips uint8 [N, num_frames, size, size, 3]:
    each digit at its own 8x8 pixels, dark ink on white, moving `speeds[i]` pixels a frame in
    `directions[i]` (left, right, up, down) along a path centred in the frame, shifted by up to
    `spread` pixels each way (None: anywhere the path stays inside the frame)."""
    free = size - 8
    ink = np.zeros((len(pixels), num_frames, size, size), np.float32)
    for i, (digit, direction, speed) in enumerate(zip(pixels, directions, speeds)):
        step = np.array(DIRECTIONS[direction], dtype=int) * int(speed)  # (rows, columns) a frame
        travel = np.abs(step) * (num_frames - 1)
        if travel.max() > free:
            raise ValueError(f"a digit moving {speed} pixels a frame for {num_frames} frames leaves a {size} px frame")
        room = free - travel  # the path's first corner lies in [0, room] (rows, columns)
        low, high = (np.zeros(2, int), room) if spread is None else (
            np.maximum(room // 2 - spread, 0), np.minimum(room // 2 + spread, room))
        start = np.where(step < 0, travel, 0) + rng.integers(low, high + 1)
        for f in range(num_frames):
            row, column = start + f * step
            ink[i, f, row:row + 8, column:column + 8] = np.asarray(digit, np.float32).reshape(8, 8) / 16.0
    grey = np.round((1.0 - ink) * 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def ink_of(images: np.ndarray) -> torch.Tensor:
    """uint8 images [B, H, W, 3] -> ink in [0, 1] as [B, H, W]: grey, inverted."""
    return 1.0 - torch.as_tensor(np.asarray(images), dtype=torch.float32).mean(dim=-1) / 255.0


def judge_input(images: np.ndarray) -> torch.Tensor:
    """uint8 images [B, H, W, 3] -> ink in [0, 1] as [B, 1, 8, 8]: grey, inverted, area-resized."""
    return F.interpolate(ink_of(images)[:, None], size=(8, 8), mode="area")


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


class DigitMotion(DigitJudge):
    """Reward of clips of a moving digit: judge 1 on every frame times a motion check,

        r = mean_f p_judge(d | crop_f) * motion,
        motion = clamp((along - across) / min_travel, 0, 1),

    d the prompted digit, crop_f frame f's `digit_size` x `digit_size` pixels centred on the
    centre of mass of its ink (bilinear, so the digit stays whole wherever it is; area-resized to
    the judge's 8x8), and along / across the displacement of that centre from the first frame to
    the last, along the prompted direction and across it, in pixels. The ramp is soft so that a
    group's clips that drift partly the right way are ranked above those that do not, and it
    saturates at `min_travel`: moving farther earns nothing more. Ink below `ink_floor` does not
    count towards the centre (a grey haze would pull it to the frame's middle), and a frame with
    less than `min_ink` of it is blank: its digit probability is 0 and, at either end, the
    clip's motion too. So a blank clip scores 0, and a still digit, however well drawn, scores 0.

    info: `answer` ("4 left": the digit the frames' mean probabilities name, "none" in a blank
    clip, and the direction the centre moved most along, "still" under `min_travel`),
    `digit_correct`, `motion_correct` (motion = 1), and `correct`, both: the judged accuracy of
    clips."""

    name, medium = "digit_motion", "video"

    def __init__(self, path: str | None = None, device: str = "cpu", digit_size: int = 8,
                 min_travel: float = 3.0, ink_floor: float = 0.2, min_ink: float = 2.0):
        super().__init__(path, device)
        self.digit_size, self.min_travel, self.ink_floor, self.min_ink = digit_size, min_travel, ink_floor, min_ink

    def centres(self, ink: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The centre of mass (row, column) of each frame's ink above the floor [N, H, W] -> [N, 2],
        and that ink's mass [N]."""
        weight = (ink - self.ink_floor).clamp(min=0)
        mass = weight.sum(dim=(1, 2))
        rows = torch.arange(ink.shape[1], dtype=ink.dtype)
        columns = torch.arange(ink.shape[2], dtype=ink.dtype)
        centre = torch.stack([(weight.sum(dim=2) * rows).sum(dim=1), (weight.sum(dim=1) * columns).sum(dim=1)], dim=1)
        return centre / mass.clamp(min=1e-6)[:, None], mass

    def crops(self, ink: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        """Each frame's `digit_size` square of ink centred on `centres` (bilinear; no ink past the
        frame), area-resized to the judge's [N, 1, 8, 8]."""
        _, height, width = ink.shape
        offsets = torch.arange(self.digit_size, dtype=ink.dtype) - (self.digit_size - 1) / 2
        rows, columns = centres[:, :1] + offsets, centres[:, 1:] + offsets  # [N, size] pixel coordinates
        # grid_sample's coordinates: -1 and 1 are the first and last pixels' centres (align_corners)
        grid = torch.stack([(2 * columns / (width - 1) - 1)[:, None, :].expand(-1, self.digit_size, -1),
                            (2 * rows / (height - 1) - 1)[:, :, None].expand(-1, -1, self.digit_size)], dim=-1)
        crops = F.grid_sample(ink[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        return F.interpolate(crops, size=(8, 8), mode="area")

    @torch.no_grad()
    def __call__(self, frames, prompts, metadata):
        count, num_frames = frames.shape[:2]
        if num_frames < 2:
            raise RewardError(f"reward '{self.name}': a clip of {num_frames} frame cannot move; set sample.num_frames >= 2")
        target = torch.tensor([prompted_digit(p, self.name) for p in prompts])
        direction = torch.tensor([DIRECTIONS[prompted_direction(p, self.name)] for p in prompts])  # [B, 2]
        ink = ink_of(frames.reshape(count * num_frames, *frames.shape[2:]))  # [B F, H, W]
        centres, mass = self.centres(ink)
        present = (mass >= self.min_ink).float().view(count, num_frames)
        probs = torch.softmax(self.model(self.crops(ink, centres).to(self.device)), dim=-1).cpu()
        probs = probs.view(count, num_frames, 10) * present[..., None]  # a blank frame names no digit
        centres = centres.view(count, num_frames, 2)
        travel = centres[:, -1] - centres[:, 0]
        along = (travel * direction).sum(dim=1)
        across = (travel * direction.flip(1)).sum(dim=1).abs()  # (r, c) -> (c, r): the perpendicular
        ends_present = present[:, 0] * present[:, -1]
        motion = ((along - across) / self.min_travel).clamp(0, 1) * ends_present
        mean_probs = probs.mean(dim=1)  # [B, 10]
        reward = mean_probs[torch.arange(count), target] * motion
        answer, drawn = mean_probs.argmax(dim=-1), mean_probs.amax(dim=-1) > 0
        digit_correct = (answer == target) & drawn
        motion_correct = motion >= 1
        unit = torch.tensor(list(DIRECTIONS.values()))  # [4, 2]
        moved = [list(DIRECTIONS)[k] for k in (travel @ unit.T).argmax(dim=1).tolist()]
        seen = [m if (t.norm() >= self.min_travel and e > 0) else "still" for m, t, e in zip(moved, travel, ends_present)]
        answers = [f"{int(a) if d else 'none'} {m}" for a, d, m in zip(answer, drawn, seen)]
        return reward.numpy(), {"answer": answers,
                                "digit_correct": digit_correct.float().tolist(),
                                "motion_correct": motion_correct.float().tolist(),
                                "correct": (digit_correct & motion_correct).float().tolist()}
