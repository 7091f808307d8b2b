"""Stable Diffusion 1.x / 2.x: a UNet on CLIP text embeddings, stepped with DDIM (the paper's)."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from ddpo.config import SampleConfig
from ddpo.ddim import check_ddim_scheduler, ddim_step_with_logprob
from ddpo.gaussian import GaussianStep
from ddpo.families import Conditioning, ModelFamily, images_of_pixels
from ddpo.media import Media


class DDIMFamily(ModelFamily):
    """What the UNet families share: DDIM steps (eta > 0) and the VAE of Stable Diffusion."""

    step_settings = "ddim"  # sample.ddim.eta
    step_name = "DDIM"
    size_rule = "its pipeline's check_inputs: height % 8, the VAE's scale factor"

    @classmethod
    def prepare(cls, pipe):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        check_ddim_scheduler(pipe.scheduler)  # at load time, not at the first step
        return super().prepare(pipe)

    def set_timesteps(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        self.scheduler.set_timesteps(num_steps, device=self.device)
        return self.scheduler.timesteps

    def latent_shape(self, height: int, width: int, num_frames: int = 1) -> tuple[int, int, int]:
        scale = self.pipe.vae_scale_factor
        return self.denoiser.config.in_channels, height // scale, width // scale

    @classmethod
    def size_multiple(cls, config_of) -> int:
        return 8  # StableDiffusionPipeline's and StableDiffusionXLPipeline's check_inputs

    def step(self, model_output, timesteps, latents, sample: SampleConfig, prev_sample=None,
             generator=None) -> GaussianStep:
        return ddim_step_with_logprob(self.scheduler, model_output, timesteps, latents, eta=sample.ddim.eta,
                                      prev_sample=prev_sample, generator=generator,
                                      log_prob_reduction=sample.log_prob_reduction)

    @classmethod
    def meta_inputs(cls, denoiser, batch, shapes):
        config, dtype = denoiser.config, denoiser.dtype
        return {"sample": torch.empty(batch, config.in_channels, shapes.latent_height, shapes.latent_width,
                                      device="meta", dtype=dtype),
                "timestep": torch.empty(batch, device="meta"),
                "encoder_hidden_states": torch.empty(batch, shapes.text_tokens, config.cross_attention_dim,
                                                     device="meta", dtype=dtype)}

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
    def decode(self, latents: torch.Tensor) -> Media:
        vae = self.pipe.vae
        image = vae.decode(self._latents_for_vae(latents.to(vae.dtype))).sample
        return images_of_pixels(image)


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
