"""Qwen-Image: a flow-matching MMDiT on the last hidden states of Qwen2.5-VL, with a video VAE
(latents [B, C, T=1, h, w], normalised by per-channel means and stds), 2x2-packed latents as
FLUX, and "true" classifier-free guidance on a negative prompt whose output is rescaled to the
conditional prediction's norm.

The text embeddings are as long as the batch's longest prompt, with a mask ("prompt_embeds_mask")
that `ddpo.families.concat` pads along when it joins conditionings of different lengths
(`sequence_masks`)."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import QwenImagePipeline

from ddpo.families import Conditioning, images_of_pixels
from ddpo.families.sd3 import FlowMatchFamily
from ddpo.media import Media


class QwenImage(FlowMatchFamily):
    class_names = ("QwenImagePipeline",)
    pipeline_class = QwenImagePipeline
    max_sequence_length = 512  # text tokens of a prompt (after the template's): QwenImagePipeline's default
    # the attention projections of both streams and both streams' feed-forward layers: the LoRA of
    # Flow-GRPO's scripts/train_qwenimage.py (configs/qwenimage_pickscore.yaml)
    default_lora_targets = FlowMatchFamily.default_lora_targets + [
        "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"]
    # the negative prompt of true CFG: Qwen-Image's model card and Flow-GRPO use a single space
    negative_prompt = " "
    # the text embeddings are as long as the prompt, their mask marks the tokens
    sequence_masks = {"prompt_embeds": "prompt_embeds_mask"}
    size_rule = "the VAE's scale factor x 2 for the 2x2 packing, as QwenImagePipeline checks"

    @classmethod
    def vae_scale_factor(cls, vae_config) -> int:
        return 2 ** len(vae_config["temperal_downsample"])  # as QwenImagePipeline (diffusers' spelling)

    @classmethod
    def size_multiple(cls, config_of) -> int:
        return cls.vae_scale_factor(config_of("vae")) * 2

    def _sigmas(self, num_steps: int) -> np.ndarray:
        return np.linspace(1.0, 1 / num_steps, num_steps)  # as QwenImagePipeline

    def latent_shape(self, height: int, width: int, num_frames: int = 1) -> tuple[int, int, int]:
        scale = self.pipe.vae_scale_factor  # rounded down to whole 2x2 patches, as QwenImagePipeline
        return self.latent_channels(self.pipe.vae.config), 2 * (height // (2 * scale)), 2 * (width // (2 * scale))

    @classmethod
    def latent_channels(cls, vae_config) -> int:
        return vae_config["z_dim"]

    @classmethod
    def meta_inputs(cls, denoiser, batch, shapes):
        config, dtype = denoiser.config, denoiser.dtype
        h, w = shapes.latent_height, shapes.latent_width
        return {"hidden_states": torch.empty(batch, (h // 2) * (w // 2), config.in_channels, device="meta", dtype=dtype),
                "timestep": torch.empty(batch, device="meta"),
                "encoder_hidden_states": torch.empty(batch, shapes.text_tokens, config.joint_attention_dim,
                                                     device="meta", dtype=dtype),
                "encoder_hidden_states_mask": None,  # the whole prompt, no padding: `forward` passes none
                "img_shapes": [[(1, h // 2, w // 2)]] * batch}

    @classmethod
    def meta_vae_input(cls, batch, shapes, dtype):
        return torch.empty(batch, shapes.latent_channels, 1, shapes.latent_height, shapes.latent_width, device="meta",
                           dtype=dtype)  # one frame of the video VAE, as `decode`

    def _encode(self, prompts: list[str]) -> Conditioning:
        embeds, mask = self.pipe.encode_prompt(prompts, device=self.text_encoder_device, num_images_per_prompt=1,
                                               max_sequence_length=self.max_sequence_length)
        if mask is None:  # the pipeline drops a mask of ones; joining batches needs it back
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}

    def encode(self, prompts, with_negative):
        negative = self._encode([self.negative_prompt] * len(prompts)) if with_negative else None
        return self._encode(prompts), negative

    def _forward_packed(self, latents, timesteps, cond: Conditioning) -> torch.Tensor:
        """The transformer's velocity on 2x2-packed tokens: [B, C, h, w] -> [B, (h/2)(w/2), 4C]."""
        b, c, h, w = latents.shape
        packed = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, 4 * c)
        mask = cond["prompt_embeds_mask"]
        return self.denoiser(
            hidden_states=packed, timestep=timesteps.to(latents.dtype) / 1000,
            encoder_hidden_states=cond["prompt_embeds"],
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,  # as the pipeline: no mask, no padding
            img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]

    @staticmethod
    def _unpack(out: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        b, c, h, w = shape  # [B, (h/2)(w/2), 4C] -> [B, C, h, w]
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def forward(self, latents, timesteps, cond: Conditioning, guidance_scale):
        return self._unpack(self._forward_packed(latents, timesteps, cond), latents.shape)

    def predict(self, latents, timesteps, cond, negative, guidance_scale):
        """True CFG as QwenImagePipeline: out = out_neg + w (out_cond - out_neg), rescaled per
        packed token (a 2x2 patch of all channels) to the norm of out_cond."""
        if negative is None:
            return super().predict(latents, timesteps, cond, None, guidance_scale)
        timesteps = torch.as_tensor(timesteps, device=latents.device).expand(latents.shape[0])
        both = torch.cat([latents, latents]).to(self.denoiser.dtype)
        out = self._forward_packed(both, torch.cat([timesteps, timesteps]), self.concat([negative, cond]))
        uncond, text = out.chunk(2)
        guided = uncond + guidance_scale * (text - uncond)
        guided = guided * (torch.norm(text, dim=-1, keepdim=True) / torch.norm(guided, dim=-1, keepdim=True))
        return self._unpack(guided, latents.shape)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> Media:
        vae = self.pipe.vae
        latents = latents.to(vae.dtype)[:, :, None]  # one frame: [B, C, 1, h, w]
        view = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(view).to(latents.device, latents.dtype)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(view).to(latents.device, latents.dtype)
        image = vae.decode(latents / inverse_std + mean, return_dict=False)[0][:, :, 0]  # as the pipeline
        return images_of_pixels(image)
