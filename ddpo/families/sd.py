"""Stable Diffusion 1.x / 2.x: a UNet on CLIP text embeddings, stepped with DDIM (the paper's)."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from ddpo.config import SampleConfig
from ddpo.diffusion import GaussianStep, check_ddim_scheduler, ddim_step_with_logprob
from ddpo.families import Conditioning, ModelFamily


class DDIMFamily(ModelFamily):
    """What the UNet families share: DDIM steps (eta > 0) and the VAE of Stable Diffusion."""

    @classmethod
    def prepare(cls, pipe):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        check_ddim_scheduler(pipe.scheduler)  # at load time, not at the first step
        return super().prepare(pipe)

    def set_timesteps(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        self.scheduler.set_timesteps(num_steps, device=self.device)
        return self.scheduler.timesteps

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        scale = self.pipe.vae_scale_factor
        return self.denoiser.config.in_channels, height // scale, width // scale

    def step(self, model_output, timesteps, latents, sample: SampleConfig, prev_sample=None,
             generator=None) -> GaussianStep:
        return ddim_step_with_logprob(self.scheduler, model_output, timesteps, latents, eta=sample.eta,
                                      prev_sample=prev_sample, generator=generator,
                                      log_prob_reduction=sample.log_prob_reduction)

    def noised(self, x0, noise, timesteps):
        # x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps; the UNet predicts eps, v or x_0
        scheduler = self.scheduler
        noisy = scheduler.add_noise(x0, noise, timesteps)
        prediction_type = scheduler.config.prediction_type
        if prediction_type == "epsilon":
            return noisy, noise
        if prediction_type == "v_prediction":
            return noisy, scheduler.get_velocity(x0, noise, timesteps)
        return noisy, x0  # "sample"

    def _latents_for_vae(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.pipe.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        vae = self.pipe.vae
        image = vae.decode(self._latents_for_vae(latents.to(vae.dtype))).sample
        image = (image.float() / 2 + 0.5).clamp(0, 1)
        return (image.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()


class StableDiffusion(DDIMFamily):
    class_names = ("StableDiffusionPipeline",)
    pipeline_class = StableDiffusionPipeline
    load_kwargs = {"safety_checker": None, "requires_safety_checker": False}

    def encode(self, prompts, with_negative):
        embeds, negative = self.pipe.encode_prompt(prompts, self.text_encoder_device, num_images_per_prompt=1,
                                                   do_classifier_free_guidance=with_negative)
        return {"prompt_embeds": embeds}, ({"prompt_embeds": negative} if with_negative else None)

    def forward(self, latents, timesteps, cond: Conditioning, guidance_scale):
        return self.denoiser(latents, timesteps, encoder_hidden_states=cond["prompt_embeds"]).sample

    def lora_layers(self, peft_state):
        from diffusers.utils import convert_state_dict_to_diffusers

        return convert_state_dict_to_diffusers(peft_state)
