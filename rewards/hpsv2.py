"""HPSv2.1, the Human Preference Score v2 (Wu et al. 2023, "Human Preference Score v2: A Solid
Benchmark for Evaluating Human Preferences of Text-to-Image Synthesis"): OpenCLIP's ViT-H/14
(laion2B-s32B-b79K) fine-tuned on HPD v2's 798k human choices between generated images. Flow-GRPO
and DanceGRPO use it as a human-preference reward. The score of an (image, prompt) pair is the
cosine of their CLIP embeddings, with no logit scale (the published `hpsv2.score`:
`image_features @ text_features.T`, its diagonal, both features normalised): about 0.25-0.32
for SD images.

Reimplemented on transformers' CLIPModel (the `hpsv2` package and open_clip pull in torchvision),
step for step as the published scoring (tgxs002/HPSv2, hpsv2/img_score.py):
1. the image: HPSv2's validation transform (`light_augmentation=True`) resizes the longer side to
   224 (bicubic) and pads the shorter one with black to a square, centred; here the image is
   padded to a square first and the CLIP image processor resizes it (bicubic) to 224: the same
   for the square images the samplers make, up to the resampling at the bars' edges otherwise;
   then CLIP's mean and std. (PIL resizes the uint8 image, with antialiasing; hpsv2 resizes the
   float tensor with torchvision, antialiased from torchvision 0.17 on: the pixels differ by
   about the uint8 rounding);
2. the prompt: CLIP's BPE tokens `<start> prompt <end>`, truncated to 77; the text embedding is
   the final LayerNorm-ed state at the end token, projected;
3. r = cos(image embedding, text embedding).

The model is either a transformers CLIPModel folder or hub id (`model`), or the published
open_clip state dict (`checkpoint`, by default `HPS_v2.1_compressed.pt` from the hub repo
xswu/HPSv2), converted on load onto a CLIPModel built from `processor`'s config (the LAION CLIP-H
repo holds the config, the tokenizer and the image processor)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel
from transformers.utils import cached_file

from rewards import RewardError
from rewards.aesthetic import _check_local_or_repo_id, _reason, clip_settings, read_state_dict, weights_file
from rewards.pickscore import LAION_CLIP_H, CLIPPreference

PUBLISHED_REPO = "xswu/HPSv2"  # on the hub: HPS_v2_compressed.pt (v2.0) and HPS_v2.1_compressed.pt
CHECKPOINT_FILENAME = "HPS_v2.1_compressed.pt"

# open_clip's CLIP -> transformers' CLIPModel: the names outside the transformer blocks ...
OPEN_CLIP_NAMES = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # sic: transformers' spelling
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "visual.proj": "visual_projection.weight",  # transposed
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "text_projection": "text_projection.weight",  # transposed
    "logit_scale": "logit_scale",
}
TRANSPOSED = ("visual.proj", "text_projection")  # open_clip applies them as `x @ proj`
# ... and inside block N of either tower (`[visual.]transformer.resblocks.N.`)
OPEN_CLIP_BLOCK_NAMES = {
    "ln_1": "layer_norm1", "attn.out_proj": "self_attn.out_proj", "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}
BLOCK = re.compile(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)")


def open_clip_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip CLIP state dict under transformers' CLIPModel names. open_clip keeps the
    projections as [width, embed_dim] matrices applied as `x @ proj` (nn.Linear's weight is the
    transpose), and each block's q, k, v as one `attn.in_proj_{weight,bias}` (nn.MultiheadAttention's,
    stacked in that order along the output dimension). Raises KeyError naming a key it does not know."""
    converted = {}
    for key, value in state.items():
        if key in OPEN_CLIP_NAMES:
            converted[OPEN_CLIP_NAMES[key]] = value.T.contiguous() if key in TRANSPOSED else value
            continue
        block = BLOCK.fullmatch(key)
        if block is None:
            raise KeyError(key)
        visual, layer, name = block.groups()
        prefix = f"{'vision_model' if visual else 'text_model'}.encoder.layers.{layer}."
        module, _, kind = name.replace("attn.in_proj_", "attn.in_proj.").rpartition(".")
        if module == "attn.in_proj" and kind in ("weight", "bias"):
            for projection, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                converted[f"{prefix}self_attn.{projection}.{kind}"] = part.contiguous()
        elif module in OPEN_CLIP_BLOCK_NAMES and kind in ("weight", "bias"):
            converted[f"{prefix}{OPEN_CLIP_BLOCK_NAMES[module]}.{kind}"] = value
        else:
            raise KeyError(key)
    return converted


def _load_open_clip(path: Path, processor: str) -> CLIPModel:
    """The open_clip state dict at `path` (as published: under the key "state_dict"), converted
    onto a CLIPModel built from `processor`'s config; every weight must be there, and no other."""
    state = read_state_dict(path, "checkpoint")
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(torch.is_tensor(value) for value in state.values()):
        raise RewardError(f"reward.params.checkpoint: '{path}' holds no state dict of tensors")
    try:
        converted = open_clip_to_transformers(state)
    except KeyError as err:
        raise RewardError(f"reward.params.checkpoint: '{path}' has {err} (not an open_clip CLIP weight)") from None
    try:
        # where there is no config.json, transformers 5 returns None here and builds a default config
        if cached_file(processor, "config.json") is None:
            raise OSError("no config.json")
        config = CLIPConfig.from_pretrained(processor)
    except (OSError, ValueError) as err:
        raise RewardError(f"reward.params.processor: no CLIP config in '{processor}' to load the checkpoint "
                          f"onto ({_reason(err)})") from None
    with torch.device("meta"):  # the names and shapes, no memory
        expected = {key: value.shape for key, value in CLIPModel(config).state_dict().items()}
    missing = [key for key in expected if key not in converted]
    if missing:  # named as transformers names them
        raise RewardError(f"reward.params.checkpoint: '{path}' lacks {len(missing)} weight(s) of the CLIP "
                          f"in '{processor}', first '{missing[0]}'")
    for key, value in converted.items():
        if key not in expected or value.shape != expected[key]:
            shape = "no such weight" if key not in expected else f"{tuple(expected[key])} expected"
            raise RewardError(f"reward.params.checkpoint: '{path}' does not fit the CLIP in '{processor}': "
                              f"'{key}' {tuple(value.shape)}, {shape}")
    return CLIPModel.from_pretrained(None, config=config, state_dict=converted)


class HPSv2(CLIPPreference):
    """r = HPSv2.1 of each image for its prompt (higher is better).

    Give `model` (a transformers CLIPModel folder or hub id) or `checkpoint` (the published
    open_clip state dict: a local file, or a local folder or hub repo holding
    `checkpoint_filename`), not both; with neither, the published HPS_v2.1 from xswu/HPSv2.
    `processor` holds the tokenizer and image processor (and, for `checkpoint`, the CLIP config):
    the LAION CLIP-H ones, which HPSv2 was fine-tuned from."""

    name = "hpsv2"

    def __init__(self, model: str | None = None, checkpoint: str | None = None,
                 checkpoint_filename: str = CHECKPOINT_FILENAME, processor: str = LAION_CLIP_H,
                 device: str = "auto", dtype: str = "float32", batch_size: int = 32):
        self.device, self.dtype, self.batch_size = clip_settings(device, dtype, batch_size)
        if model is not None and checkpoint is not None:
            raise RewardError("reward.params.model: give model or checkpoint, not both")
        if model is None:
            path = weights_file(checkpoint or PUBLISHED_REPO, checkpoint_filename, "checkpoint", "checkpoint_filename")
            self._load_processor(processor)
            clip = _load_open_clip(path, processor)
        else:
            _check_local_or_repo_id(model, "model")
            self._load_processor(processor)
            try:
                clip = CLIPModel.from_pretrained(model)
            except (OSError, ValueError) as err:
                raise RewardError(f"reward.params.model: cannot load '{model}' ({_reason(err)})") from None
        self.clip = clip.to(self.device, self.dtype).eval()

    def to_image(self, image: np.ndarray) -> Image.Image:
        """The image padded with black to a square, centred (step 1 above)."""
        height, width, _ = image.shape
        side = max(height, width)
        top, left = (side - height) // 2, (side - width) // 2
        padding = ((top, side - height - top), (left, side - width - left), (0, 0))
        return Image.fromarray(np.pad(image, padding) if height != width else image)

    @torch.inference_mode()
    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict]):
        scores = self.cosines(images, prompts).numpy().astype(np.float32)
        return scores, {"hpsv2": scores.tolist()}
