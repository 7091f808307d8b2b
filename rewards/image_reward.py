"""ImageReward (Xu et al. 2023, NeurIPS, "ImageReward: Learning and Evaluating Human Preferences
for Text-to-Image Generation"): a BLIP whose text encoder reads the prompt while cross-attending to
the image, and a linear head on its first output token, trained on 137k expert comparisons of
generated images; scores are standardised with the published mean and std (a scale of about ±2,
higher is better). Flow-GRPO's code offers it as a reward; MixGRPO trains FLUX on it together with
HPSv2 and PickScore.

Reimplemented on transformers' BLIP modules (the `image-reward` package pulls in timm, fairscale,
clip and torchvision), step for step as the published `ImageReward.score` (THUDM/ImageReward,
ImageReward/ImageReward.py):
1. the image, resized (shorter side, bicubic) and center-cropped to 224, normalised with CLIP's
   mean and std, goes through the ViT-L/16: all 197 tokens after its final LayerNorm (an odd crop
   margin, as on some non-square images, is rounded by torchvision and floored here: one pixel);
2. the prompt, BERT-tokenised as `[CLS] prompt [SEP]`, truncated and padded to 35 tokens, goes
   through BLIP's text encoder (BERT-base, every layer self-attention over the prompt, then
   cross-attention to all image tokens, unmasked); the first token stays [CLS]: the published
   `score` does not swap in [ENC] as BLIP's image-text-matching head does;
3. r = (mlp(h_[CLS]) - mean) / std, the head on the first output token in float32, standardised
   with the published mean and std.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoTokenizer, BlipConfig, BlipTextModel, BlipVisionModel
from transformers.initialization import no_init_weights
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.utils import cached_file

from rewards import RewardError
from rewards.aesthetic import (AestheticMLP, _check_local_or_repo_id, _reason, clip_settings, read_state_dict,
                               weights_file)

PUBLISHED_REPO = "THUDM/ImageReward"  # on the hub: ImageReward.pt and med_config.json
CHECKPOINT_FILENAME = "ImageReward.pt"
WEIGHTS_FILENAME = "model.safetensors"  # a `model` folder: this, config.json and the tokenizer
SCORE_MEAN, SCORE_STD = 0.16717362830052426, 1.0333394966054072  # ImageReward.py: self.mean, self.std
MAX_LENGTH = 35  # ImageReward.py: the tokenizer's max_length


def image_reward_config() -> BlipConfig:
    """ImageReward's BLIP: BLIP_Pretrain(image_size=224, vit='large') and the published
    med_config.json (BERT-base, 30522 + [DEC] + [ENC] tokens, cross-attention in every layer).
    BLIP's ViT LayerNorms use eps 1e-6 (vit.py), not BlipVisionConfig's 1e-5; `is_decoder` only
    builds the cross-attention layers: the encoder is run bidirectionally."""
    return BlipConfig(
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=224, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6),
        text_config=dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=512, hidden_act="gelu",
                         layer_norm_eps=1e-12, pad_token_id=0, is_decoder=True),
    )  # BlipConfig sets the text encoder's cross-attention width to the ViT's, 1024


class ImageRewardModel(torch.nn.Module):
    """BLIP's ViT, BLIP's text encoder (no pooler), and the head: the aesthetic predictor's MLP
    (ImageReward.py builds it from that code base: the same layers, keys `mlp.layers.{0,2,4,6,7}`)."""

    def __init__(self, config: BlipConfig):
        super().__init__()
        self.config = config
        self.vision_model = BlipVisionModel(config.vision_config)
        self.text_encoder = BlipTextModel(config.text_config, add_pooling_layer=False)
        self.mlp = AestheticMLP(config.text_config.hidden_size)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        """mlp(h_[CLS]) [B] in float32, before the standardisation."""
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
        text = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask, is_decoder=False,
                                 encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask)
        return self.mlp(text.last_hidden_state[:, 0].float()).squeeze(-1)


# published key (prefix) -> ImageRewardModel key; a key matching none is dropped (BLIP's contrastive
# projections vision_proj / text_proj, the text encoder's position_ids buffer)
CHECKPOINT_RENAMES = [
    (r"^blip\.visual_encoder\.cls_token$", "vision_model.embeddings.class_embedding"),
    (r"^blip\.visual_encoder\.pos_embed$", "vision_model.embeddings.position_embedding"),
    (r"^blip\.visual_encoder\.patch_embed\.proj\.", "vision_model.embeddings.patch_embedding."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.norm(1|2)\.", r"vision_model.encoder.layers.\1.layer_norm\2."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.qkv\.", r"vision_model.encoder.layers.\1.self_attn.qkv."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision_model.encoder.layers.\1.self_attn.projection."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.", r"vision_model.encoder.layers.\1.mlp.\2."),
    (r"^blip\.visual_encoder\.norm\.", "vision_model.post_layernorm."),
    (r"^blip\.text_encoder\.(embeddings\.(word|position)_embeddings|embeddings\.LayerNorm|encoder)\.",
     r"text_encoder.\1."),  # BLIP's med.py BertModel names are BlipTextModel's
    (r"^mlp\.layers\.", "mlp.layers."),
]


def convert_checkpoint(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The published ImageReward.pt state dict with ImageRewardModel's key names."""
    converted = {}
    for key, value in state.items():
        for pattern, replacement in CHECKPOINT_RENAMES:
            name, matched = re.subn(pattern, replacement, key)
            if matched:
                converted[name] = value
                break
    return converted


def _model_file(name: str, filename: str, key: str) -> str:
    """`filename` in the local folder or hub repo `name`."""
    _check_local_or_repo_id(name, key)
    try:
        path = cached_file(name, filename)
    except OSError as err:  # offline and not cached, no such repo or file
        raise RewardError(f"reward.params.{key}: cannot load '{name}' ({_reason(err)})") from None
    if path is None:  # a local folder without it
        raise RewardError(f"reward.params.{key}: cannot load '{name}' (no {filename})")
    return path


def _blip_config(name: str, key: str) -> BlipConfig:
    """The BlipConfig in a config.json file, or in a local folder or hub repo holding one; checked
    to be one (transformers would build a default, full-size BLIP from a folder without it)."""
    path = name if Path(name).expanduser().is_file() else _model_file(name, "config.json", key)
    try:
        config_dict, _ = BlipConfig.get_config_dict(path)
    except (OSError, ValueError) as err:
        raise RewardError(f"reward.params.{key}: cannot load '{name}' ({_reason(err)})") from None
    if config_dict.get("model_type") != "blip":
        raise RewardError(f"reward.params.{key}: '{path}' is not a BLIP config "
                          f"(model_type {config_dict.get('model_type')!r}, not 'blip')")
    return BlipConfig.from_dict(config_dict)


def _load_into(model: ImageRewardModel, state: dict[str, torch.Tensor], key: str, source: str) -> None:
    """All of the model's weights from `state`, none left at their random init."""
    missing, unexpected = model.state_dict().keys() - state.keys(), state.keys() - model.state_dict().keys()
    if missing or unexpected:
        what = f"missing {min(missing)!r}" if missing else f"unexpected {min(unexpected)!r}"
        raise RewardError(f"reward.params.{key}: '{source}' does not fit this ImageReward model ({what}, "
                          f"{len(missing)} missing and {len(unexpected)} unexpected keys)")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # torch lists the mismatches from the second line on
        detail = str(err).splitlines()[1].strip()
        raise RewardError(f"reward.params.{key}: '{source}' does not fit this ImageReward model ({detail})") from None


class ImageReward:
    """r = ImageReward of each image for its prompt (higher is better).

    Give one of
    - `model`: a folder or hub repo in this module's format (config.json: a BlipConfig;
      model.safetensors: ImageRewardModel's state dict; the tokenizer), as `save_pretrained` writes;
    - `checkpoint`: the published ImageReward.pt (a local file, or a folder or hub repo holding it;
      the default, when neither is given, is THUDM/ImageReward), converted on load onto a model
      built from `config` (a BlipConfig file, folder or hub repo; default: ImageReward's sizes).
    `tokenizer` defaults to the model folder's, and for a checkpoint to bert-base-uncased with
    BLIP's [DEC] and [ENC] tokens added. The head runs in float32 whatever `dtype` the BLIP has."""

    def __init__(self, model: str | None = None, checkpoint: str | None = None, config: str | None = None,
                 tokenizer: str | None = None, device: str = "auto", dtype: str = "float32", batch_size: int = 32):
        self.device, self.dtype, self.batch_size = clip_settings(device, dtype, batch_size)
        if model is not None and checkpoint is not None:
            raise RewardError("reward.params.checkpoint: give reward.params.model or reward.params.checkpoint, "
                              "not both")
        if model is not None and config is not None:
            raise RewardError("reward.params.config: only with reward.params.checkpoint (a model folder holds its "
                              "own config.json)")
        if model is not None:
            self.model, self.tokenizer = self._load_model(model), self._load_tokenizer(tokenizer or model)
        else:
            self.model = self._load_checkpoint(checkpoint or PUBLISHED_REPO, config)
            self.tokenizer = self._load_tokenizer(tokenizer or "bert-base-uncased")
            # BLIP's init_tokenizer: [DEC] as bos, [ENC] added (ids 30522, 30523 for bert-base-uncased)
            self.tokenizer.add_special_tokens({"bos_token": "[DEC]"})
            self.tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        vocab_size = self.model.config.text_config.vocab_size
        if len(self.tokenizer) > vocab_size:
            raise RewardError(f"reward.params.tokenizer: {len(self.tokenizer)} tokens, more than the text encoder's "
                              f"vocab_size {vocab_size}")
        self.model.to(self.device, self.dtype).eval()
        self.model.mlp.float()
        image_size = self.model.config.vision_config.image_size
        # CLIP's preprocessing, as ImageReward.py's _transform: bicubic resize of the shorter side,
        # center crop, x / 255, CLIP mean and std (the processor's defaults), on PIL images
        self.image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                                     crop_size={"height": image_size, "width": image_size})

    @staticmethod
    def _load_model(model: str) -> ImageRewardModel:
        config = _blip_config(model, "model")
        with no_init_weights():  # every weight is loaded next (20 s of random init saved at full size)
            built = ImageRewardModel(config)
        weights = Path(_model_file(model, WEIGHTS_FILENAME, "model"))
        _load_into(built, read_state_dict(weights, "model"), "model", model)
        return built

    @staticmethod
    def _load_checkpoint(checkpoint: str, config: str | None) -> ImageRewardModel:
        path = weights_file(checkpoint, CHECKPOINT_FILENAME, "checkpoint", "checkpoint")
        blip_config = image_reward_config() if config is None else _blip_config(config, "config")
        with no_init_weights():  # every weight is loaded next
            built = ImageRewardModel(blip_config)
        _load_into(built, convert_checkpoint(read_state_dict(path, "checkpoint")), "checkpoint", str(path))
        return built

    @staticmethod
    def _load_tokenizer(tokenizer: str):
        _check_local_or_repo_id(tokenizer, "tokenizer")
        try:
            return AutoTokenizer.from_pretrained(tokenizer)
        except (OSError, ValueError) as err:
            raise RewardError(f"reward.params.tokenizer: cannot load '{tokenizer}' ({_reason(err)})") from None

    def save_pretrained(self, folder: str | Path) -> None:
        """Write this model as a `model` folder: config.json, model.safetensors and the tokenizer."""
        folder = Path(folder)
        self.model.config.save_pretrained(folder)
        state = {key: value.detach().cpu().contiguous() for key, value in self.model.state_dict().items()}
        save_file(state, folder / WEIGHTS_FILENAME)
        self.tokenizer.save_pretrained(folder)

    @torch.inference_mode()
    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict]):
        if len(prompts) != len(images):
            raise RewardError(f"reward 'image_reward': {len(prompts)} prompts for {len(images)} images")
        scores = [torch.zeros(0)]
        for start in range(0, len(images), self.batch_size):
            end = start + self.batch_size
            batch = [Image.fromarray(image) for image in images[start:end]]
            pixels = self.image_processor(images=batch, return_tensors="pt")["pixel_values"]
            tokens = self.tokenizer(list(prompts[start:end]), padding="max_length", truncation=True,
                                    max_length=MAX_LENGTH, return_tensors="pt").to(self.device)
            raw = self.model(pixels.to(self.device, self.dtype), tokens["input_ids"], tokens["attention_mask"])
            scores.append(((raw - SCORE_MEAN) / SCORE_STD).cpu())
        scores = torch.cat(scores).numpy().astype(np.float32)
        return scores, {"image_reward": scores.tolist()}
