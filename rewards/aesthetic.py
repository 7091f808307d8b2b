"""LAION aesthetic score, the DDPO paper's aesthetic-quality reward: the "improved aesthetic
predictor" (christophschuhmann/improved-aesthetic-predictor, `sac+logos+ava1-l14-linearMSE.pth`),
a stack of linear layers on the L2-normalised CLIP ViT-L/14 image embedding, trained to predict
the 1-10 rating people give an image."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HFValidationError
from huggingface_hub.utils import validate_repo_id
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoImageProcessor, CLIPModel

from rewards import RewardError

DTYPES = ("float32", "float16", "bfloat16")


def clip_settings(device: str, dtype: str, batch_size: int) -> tuple[torch.device, torch.dtype, int]:
    """A CLIP reward's `device` (`auto`: cuda when there is one), `dtype` and `batch_size`
    params, checked: one-line RewardErrors naming the param."""
    if dtype not in DTYPES:
        raise RewardError(f"reward.params.dtype: must be one of {list(DTYPES)}, got {dtype!r}")
    if batch_size < 1:
        raise RewardError(f"reward.params.batch_size: must be >= 1, got {batch_size}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device), getattr(torch, dtype), batch_size


class AestheticMLP(torch.nn.Module):
    """The predictor's head: no activations, so it is one affine map in five factors. Its
    state-dict keys are `layers.{0,2,4,6,7}.{weight,bias}`, as in the published file."""

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(embed_dim, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, embed: torch.Tensor) -> torch.Tensor:
        return self.layers(embed)


def _reason(err: BaseException) -> str:
    """A library's error cut to its first sentence, for a one-line message."""
    first = str(err).strip().split("\n")[0].split(". ")[0].rstrip(".")
    return f"{type(err).__name__}: {first}"


def _check_local_or_repo_id(name: str, key: str) -> None:
    """Something that is not there and cannot be a hub repo id is a missing local path."""
    if not Path(name).expanduser().exists():
        try:
            validate_repo_id(name)
        except HFValidationError:
            raise RewardError(f"reward.params.{key}: no such file or folder '{name}'") from None


def weights_file(value: str, filename: str, param: str, filename_param: str) -> Path:
    """A local file, `filename` in a local folder, or `filename` from the hub repo `value`; the
    errors name `reward.params.<param>` (and `<filename_param>` for a folder without the file)."""
    path = Path(value).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if not (path / filename).is_file():
            raise RewardError(f"reward.params.{filename_param}: no '{filename}' in '{path}'")
        return path / filename
    _check_local_or_repo_id(value, param)
    try:
        return Path(hf_hub_download(value, filename))
    except (OSError, EntryNotFoundError) as err:  # offline and not cached, no such repo or file
        raise RewardError(f"reward.params.{param}: no local '{value}', and no '{filename}' from the hub repo "
                          f"of that name ({_reason(err)})") from None


def read_state_dict(path: Path, param: str) -> dict[str, torch.Tensor]:
    """The weights in a .safetensors file or a torch checkpoint (the weights file of
    `reward.params.<param>`); a one-line RewardError naming it when it cannot be read."""
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        # weights_only: tensors and plain containers, never arbitrary pickled objects
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, SafetensorError, RuntimeError, OSError, EOFError) as err:
        raise RewardError(f"reward.params.{param}: cannot read '{path}' as a state dict ({_reason(err)})") from None


class AestheticScore:
    """r = the predicted aesthetic rating of each image (higher is better).

    `head` is a local .safetensors or .pth state dict, a local folder holding `head_filename`, or a
    hub repo holding it; the default is the published head as TRL's DDPO example hosts it."""

    def __init__(self, clip_model: str = "openai/clip-vit-large-patch14",
                 head: str = "trl-lib/ddpo-aesthetic-predictor", head_filename: str = "aesthetic-model.pth",
                 device: str = "auto", dtype: str = "float32", batch_size: int = 32):
        self.device, self.dtype, self.batch_size = clip_settings(device, dtype, batch_size)
        state = read_state_dict(weights_file(head, head_filename, "head", "head_filename"), "head")
        _check_local_or_repo_id(clip_model, "clip_model")
        try:
            self.processor = AutoImageProcessor.from_pretrained(clip_model, backend="pil")
            self.clip = CLIPModel.from_pretrained(clip_model).to(self.device, self.dtype).eval()
        except OSError as err:
            raise RewardError(f"reward.params.clip_model: cannot load '{clip_model}' ({_reason(err)})") from None
        # the head's input width is the CLIP projection width (768 for ViT-L/14)
        self.head = AestheticMLP(self.clip.config.projection_dim)
        try:
            self.head.load_state_dict(state)
        except RuntimeError as err:  # torch lists the mismatches from the second line on
            detail = str(err).splitlines()[1].strip()
            raise RewardError(f"reward.params.head: '{head}' is not an aesthetic head for {clip_model} "
                              f"({detail})") from None
        self.head.to(self.device).eval()

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The CLIP image embedding (projected pooled vision output), L2-normalised."""
        pooled = self.clip.vision_model(pixel_values=pixel_values).pooler_output
        embed = self.clip.visual_projection(pooled).float()
        return embed / torch.linalg.vector_norm(embed, dim=-1, keepdim=True)

    @torch.no_grad()
    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict]):
        scores = []
        for start in range(0, len(images), self.batch_size):
            batch = [Image.fromarray(image) for image in images[start:start + self.batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"]
            scores.append(self.head(self.embed(pixels.to(self.device, self.dtype))).squeeze(1))
        scores = torch.cat(scores).cpu().numpy()
        return scores, {"aesthetic": scores.tolist()}
