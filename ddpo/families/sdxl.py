"""SDXL: a UNet on two CLIP text encoders plus the added conditioning (the pooled text embedding
and the size/crop "time ids"), stepped with DDIM like SD 1.x."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionXLPipeline

from ddpo.families import Conditioning
from ddpo.families.sd import DDIMFamily


class StableDiffusionXL(DDIMFamily):
    class_names = ("StableDiffusionXLPipeline",)
    pipeline_class = StableDiffusionXLPipeline

    @classmethod
    def prepare(cls, pipe):
        cls.upcast(pipe.components)
        return super().prepare(pipe)

    @classmethod
    def upcast(cls, components):
        # SDXL's VAE overflows in float16 (its config says force_upcast): decode in float32
        vae = components.get("vae")
        if vae is not None and vae.dtype == torch.float16 and vae.config.get("force_upcast", False):
            vae.to(torch.float32)

    @classmethod
    def meta_inputs(cls, denoiser, batch, shapes):
        """The UNet's inputs and the added conditioning: the pooled text embedding and the 6 time ids."""
        config, dtype = denoiser.config, denoiser.dtype
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        return {**super().meta_inputs(denoiser, batch, shapes),
                "added_cond_kwargs": {"text_embeds": torch.empty(batch, pooled, device="meta", dtype=dtype),
                                      "time_ids": torch.empty(batch, 6, device="meta", dtype=dtype)}}

    @classmethod
    def meta_conditioning(cls, inputs):
        return [*super().meta_conditioning(inputs), inputs["added_cond_kwargs"]["text_embeds"]]  # not the time ids

    def encode(self, prompts, with_negative):
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompts, device=self.text_encoder_device, num_images_per_prompt=1,
            do_classifier_free_guidance=with_negative)
        cond = {"prompt_embeds": embeds, "pooled": pooled}
        return cond, ({"prompt_embeds": negative, "pooled": negative_pooled} if with_negative else None)

    def forward(self, latents, timesteps, cond: Conditioning, guidance_scale):
        # time ids: original size, crop top-left, target size; both sizes the image's (the
        # pipeline's default)
        size = [d * self.pipe.vae_scale_factor for d in latents.shape[-2:]]
        time_ids = torch.tensor([size + [0, 0] + size], dtype=cond["prompt_embeds"].dtype,
                                device=latents.device).expand(latents.shape[0], -1)
        return self.denoiser(latents, timesteps, encoder_hidden_states=cond["prompt_embeds"],
                             added_cond_kwargs={"text_embeds": cond["pooled"], "time_ids": time_ids}).sample

    def _latents_for_vae(self, latents):
        c = self.pipe.vae.config
        if getattr(c, "latents_mean", None) is not None and getattr(c, "latents_std", None) is not None:
            mean = torch.tensor(c.latents_mean, device=latents.device).view(1, -1, 1, 1)
            std = torch.tensor(c.latents_std, device=latents.device).view(1, -1, 1, 1)
            return (latents * std / c.scaling_factor + mean).to(latents.dtype)
        return latents / c.scaling_factor

    def lora_layers(self, peft_state):
        from diffusers.utils import convert_state_dict_to_diffusers

        return convert_state_dict_to_diffusers(peft_state)
