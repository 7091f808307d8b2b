"""FLUX.1: a flow-matching transformer on CLIP's pooled embedding and T5, with 2x2-packed latents
and, for FLUX.1-dev, guidance as an input embedding (one forward, no classifier-free batch)."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FluxPipeline

from ddpo.families import Conditioning
from ddpo.families.sd3 import FlowMatchFamily


class Flux(FlowMatchFamily):
    class_names = ("FluxPipeline",)
    pipeline_class = FluxPipeline
    max_sequence_length = 512  # T5 tokens, FluxPipeline's default (the instance's: model.max_sequence_length)
    size_rule = "the VAE's scale factor x 2 for the 2x2 packing, as FluxPipeline checks"

    @classmethod
    def size_multiple(cls, config_of) -> int:
        return cls.vae_scale_factor(config_of("vae")) * 2

    def uses_cfg(self, guidance_scale: float) -> bool:
        return False  # guidance is distilled into the model (FLUX.1-dev) or absent (schnell)

    def _sigmas(self, num_steps: int) -> np.ndarray:
        return np.linspace(1.0, 1 / num_steps, num_steps)  # as FluxPipeline

    @classmethod
    def meta_inputs(cls, denoiser, batch, shapes):
        config, dtype = denoiser.config, denoiser.dtype
        tokens = (shapes.latent_height // 2) * (shapes.latent_width // 2)  # 2x2 patches packed into tokens of 4C
        return {"hidden_states": torch.empty(batch, tokens, config.in_channels, device="meta", dtype=dtype),
                "timestep": torch.empty(batch, device="meta"),
                "encoder_hidden_states": torch.empty(batch, shapes.text_tokens, config.joint_attention_dim,
                                                     device="meta", dtype=dtype),
                "pooled_projections": torch.empty(batch, config.pooled_projection_dim, device="meta", dtype=dtype),
                "guidance": torch.empty(batch, device="meta") if config.guidance_embeds else None,
                "txt_ids": torch.empty(shapes.text_tokens, 3, device="meta", dtype=dtype),
                "img_ids": torch.empty(tokens, 3, device="meta", dtype=dtype)}

    def encode(self, prompts, with_negative):
        embeds, pooled, _ = self.pipe.encode_prompt(prompts, None, device=self.text_encoder_device,
                                                    num_images_per_prompt=1,
                                                    max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds, "pooled": pooled}, None

    def forward(self, latents, timesteps, cond: Conditioning, guidance_scale):
        b, c, h, w = latents.shape
        # pack 2x2 patches into tokens: [B, C, h, w] -> [B, (h/2)(w/2), 4C], as FluxPipeline
        packed = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)
        image_ids = torch.zeros(h // 2, w // 2, 3, device=latents.device)
        image_ids[..., 1] += torch.arange(h // 2, device=latents.device)[:, None]
        image_ids[..., 2] += torch.arange(w // 2, device=latents.device)[None, :]
        embeds = cond["prompt_embeds"]
        guidance = (torch.full((b,), guidance_scale, device=latents.device, dtype=torch.float32)
                    if self.denoiser.config.guidance_embeds else None)
        out = self.denoiser(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                            pooled_projections=cond["pooled"], encoder_hidden_states=embeds,
                            txt_ids=torch.zeros(embeds.shape[1], 3, device=latents.device, dtype=embeds.dtype),
                            img_ids=image_ids.reshape(-1, 3).to(embeds.dtype)).sample
        # unpack: [B, (h/2)(w/2), 4C] -> [B, C, h, w]
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
