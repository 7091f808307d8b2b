"""Temporal consistency, a reward of videos: how alike a clip's consecutive frames look to CLIP.
r = mean over t of cos(e_t, e_{t+1}), e_t the L2-normalised CLIP image embedding of frame t
(the "subject consistency" / CLIP-similarity measure of video benchmarks): near 1 for a steady
clip, lower for flicker and sudden changes. It says nothing of the prompt: pair it with a reward
that does (`reward.weighted`)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, CLIPModel

from rewards import RewardError
from rewards.aesthetic import _check_local_or_repo_id, _reason, clip_settings
from rewards.pickscore import _features


class TemporalConsistency:
    """r = the mean cosine similarity of the CLIP image embeddings of each clip's consecutive
    frames, in [-1, 1] (higher is steadier).

    `clip_model` is a CLIP (a local folder or a hub id); `processor` holds its image processor
    (default: the same folder or repo). Frames are embedded in batches of `batch_size`."""

    medium = "video"

    def __init__(self, clip_model: str = "openai/clip-vit-large-patch14", processor: str | None = None,
                 device: str = "auto", dtype: str = "float32", batch_size: int = 32):
        self.device, self.dtype, self.batch_size = clip_settings(device, dtype, batch_size)
        processor = processor or clip_model
        _check_local_or_repo_id(clip_model, "clip_model")
        _check_local_or_repo_id(processor, "processor")
        try:
            # the PIL image processor, as CLIP was trained with, whether or not torchvision is there
            self.processor = AutoImageProcessor.from_pretrained(processor, backend="pil")
        except (OSError, ValueError) as err:
            raise RewardError(f"reward.params.processor: cannot load '{processor}' ({_reason(err)})") from None
        try:
            self.clip = CLIPModel.from_pretrained(clip_model).to(self.device, self.dtype).eval()
        except (OSError, ValueError) as err:
            raise RewardError(f"reward.params.clip_model: cannot load '{clip_model}' ({_reason(err)})") from None

    @torch.inference_mode()
    def embed(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 frames [N, H, W, 3] as CLIP image embeddings [N, d], L2-normalised, float32 on the CPU."""
        embeds = [torch.zeros(0, self.clip.config.projection_dim)]
        for start in range(0, len(frames), self.batch_size):
            batch = [Image.fromarray(frame) for frame in frames[start:start + self.batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"]
            embed = _features(self.clip.get_image_features(pixel_values=pixels.to(self.device, self.dtype))).float()
            embeds.append((embed / torch.linalg.vector_norm(embed, dim=-1, keepdim=True)).cpu())
        return torch.cat(embeds)

    def __call__(self, frames: np.ndarray, prompts: list[str], metadata: list[dict]):
        count, num_frames = frames.shape[:2]
        if num_frames < 2:
            raise RewardError(f"reward 'temporal_consistency': a clip of {num_frames} frame has no consecutive "
                              "frames to compare; set sample.num_frames >= 2")
        embeds = self.embed(frames.reshape(count * num_frames, *frames.shape[2:])).reshape(count, num_frames, -1)
        # cos(e_t, e_{t+1}) of unit vectors: their dot product, [B, F - 1]
        cosines = (embeds[:, :-1] * embeds[:, 1:]).sum(dim=-1).clamp(-1.0, 1.0).numpy()
        scores = cosines.mean(axis=1).astype(np.float32)
        # the least alike neighbours: a cut or a flash that the mean hides
        return scores, {"temporal_consistency": scores.tolist(), "frame_similarity_min": cosines.min(axis=1).tolist()}
