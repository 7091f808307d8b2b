"""PickScore (Kirstain et al. 2023, "Pick-a-Pic"), the usual reward for SD3.5 / FLUX RL
fine-tuning (Flow-GRPO): a CLIP ViT-H/14 fine-tuned on people's pairwise preferences between
images for the same prompt. The score is the CLIP logit of the (image, prompt) pair,
`logit_scale.exp() * cos(image_embedding, text_embedding)`, about 20-23 for good SD images."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

from rewards import RewardError
from rewards.aesthetic import _check_local_or_repo_id, _reason, clip_settings

LAION_CLIP_H = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # the tokenizer and image processor of the CLIP-H fine-tunes


def _features(output) -> torch.Tensor:
    """`get_*_features` returns the projected embedding, as a tensor (transformers 4) or as the
    pooler output of a model output (transformers 5)."""
    return output if torch.is_tensor(output) else output.pooler_output


class CLIPPreference:
    """What the CLIP preference rewards (PickScore, HPSv2) share: a CLIP (`self.clip`, loaded by
    the subclass), its tokenizer and image processor, and the cosine between each image's
    embedding and its prompt's, in batches of `self.batch_size`. Prompts longer than the
    tokenizer's max length (77 tokens) are truncated."""

    name = "clip"

    def _load_processor(self, processor: str) -> None:
        _check_local_or_repo_id(processor, "processor")
        try:
            # the PIL image processor, as the CLIPs were trained with, whether or not torchvision is there
            self.image_processor = AutoImageProcessor.from_pretrained(processor, backend="pil")
            self.tokenizer = AutoTokenizer.from_pretrained(processor)
        except (OSError, ValueError) as err:
            raise RewardError(f"reward.params.processor: cannot load '{processor}' ({_reason(err)})") from None

    @property
    def max_length(self) -> int:
        # a tokenizer saved without a max length reports a huge one: the position table bounds it
        return min(self.tokenizer.model_max_length, self.clip.config.text_config.max_position_embeddings)

    def to_image(self, image: np.ndarray) -> Image.Image:
        """One uint8 [H, W, 3] image as the image processor takes it."""
        return Image.fromarray(image)

    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        """The CLIP image embeddings, L2-normalised, in float32."""
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        embed = _features(self.clip.get_image_features(pixel_values=pixels.to(self.device, self.dtype))).float()
        return embed / torch.linalg.vector_norm(embed, dim=-1, keepdim=True)

    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        """The CLIP text embeddings, L2-normalised, in float32."""
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        embed = _features(self.clip.get_text_features(input_ids=tokens["input_ids"],
                                                      attention_mask=tokens["attention_mask"])).float()
        return embed / torch.linalg.vector_norm(embed, dim=-1, keepdim=True)

    @torch.inference_mode()
    def cosines(self, images: np.ndarray, prompts: list[str]) -> torch.Tensor:
        """cos(image embedding, prompt embedding) of each pair, float32 on the CPU."""
        if len(prompts) != len(images):
            raise RewardError(f"reward '{self.name}': {len(prompts)} prompts for {len(images)} images")
        cosines = [torch.zeros(0)]
        for start in range(0, len(images), self.batch_size):
            end = start + self.batch_size
            image_embed = self.embed_images([self.to_image(image) for image in images[start:end]])
            text_embed = self.embed_texts(list(prompts[start:end]))
            cosines.append((image_embed * text_embed).sum(dim=-1).cpu())
        return torch.cat(cosines)


class PickScore(CLIPPreference):
    """r = PickScore of each image for its prompt (higher is better).

    `model` is the CLIP model (a local folder or a hub id); `processor` holds its tokenizer and
    image processor (PickScore_v1 ships neither: they are the LAION CLIP-H ones). Prompts longer
    than the tokenizer's max length (77 tokens) are truncated."""

    name = "pickscore"

    def __init__(self, model: str = "yuvalkirstain/PickScore_v1", processor: str = LAION_CLIP_H,
                 device: str = "auto", dtype: str = "float32", batch_size: int = 32):
        self.device, self.dtype, self.batch_size = clip_settings(device, dtype, batch_size)
        _check_local_or_repo_id(model, "model")
        self._load_processor(processor)
        try:
            self.clip = CLIPModel.from_pretrained(model).to(self.device, self.dtype).eval()
        except (OSError, ValueError) as err:
            raise RewardError(f"reward.params.model: cannot load '{model}' ({_reason(err)})") from None

    @torch.inference_mode()
    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict]):
        scale = self.clip.logit_scale.float().exp().cpu()
        scores = (scale * self.cosines(images, prompts)).numpy().astype(np.float32)
        return scores, {"pickscore": scores.tolist()}
