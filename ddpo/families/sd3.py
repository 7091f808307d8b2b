"""Stable Diffusion 3 / 3.5: a flow-matching transformer (MMDiT) on two CLIP text encoders and an
optional T5, stepped with Flow-GRPO's SDE (ddpo/flow.py)."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import StableDiffusion3Pipeline

from ddpo.config import SampleConfig
from ddpo.diffusion import GaussianStep
from ddpo.families import Conditioning, ModelFamily
from ddpo.flow import ode_step, sde_step_with_logprob


class FlowMatchFamily(ModelFamily):
    """What the flow-matching transformers share: a FlowMatchEulerDiscreteScheduler schedule,
    the SDE step (Flow-GRPO's or CPS), the ODE step outside an SDE window, x_t = (1 - sigma) x_0 +
    sigma eps with velocity v = eps - x_0."""

    denoiser_name = "transformer"
    # the attention projections of every attention module; on SD3.5-Medium this also takes the
    # second self-attention (attn2) of its dual-attention blocks, which Flow-GRPO leaves out (its
    # `attn.*` list: configs/sd35_pickscore.yaml)
    default_lora_targets = ["to_q", "to_k", "to_v", "to_out.0",
                            "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    max_sequence_length: int  # T5 tokens of a prompt (zeros without T5): the pipeline's default

    def __init__(self, pipe, max_sequence_length: int | None = None):
        """`max_sequence_length`: the T5 tokens of a prompt (`model.max_sequence_length`), as the
        model was trained with; None keeps the pipeline's default."""
        super().__init__(pipe)
        if max_sequence_length is not None:
            self.max_sequence_length = max_sequence_length

    def _image_seq_len(self, height: int, width: int) -> int:
        _, h, w = self.latent_shape(height, width)
        return (h // 2) * (w // 2)  # 2x2 patches: SD3's patch_size, FLUX's packing

    def _sigmas(self, num_steps: int) -> np.ndarray | None:
        """The schedule's sigmas before the shift, where the pipeline gives its own."""
        return None

    def set_timesteps(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        scheduler, kwargs = self.scheduler, {}
        if scheduler.config.get("use_dynamic_shifting", False):  # the shift grows with the image
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            c = scheduler.config
            kwargs["mu"] = calculate_shift(self._image_seq_len(height, width), c.get("base_image_seq_len", 256),
                                           c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5),
                                           c.get("max_shift", 1.15))
        scheduler.set_timesteps(num_steps, device=self.device, sigmas=self._sigmas(num_steps), **kwargs)
        return scheduler.timesteps

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        scale = self.pipe.vae_scale_factor
        return self.pipe.vae.config.latent_channels, height // scale, width // scale

    @classmethod
    def check_config(cls, config) -> None:
        """An SDE window, CPS and DiffusionNFT are all flow-matching methods: nothing to refuse."""

    def step(self, model_output, timesteps, latents, sample: SampleConfig, prev_sample=None,
             generator=None) -> GaussianStep:
        return sde_step_with_logprob(
            self.scheduler, model_output, timesteps, latents, noise_level=sample.noise_level,
            prev_sample=prev_sample, generator=generator, log_prob_reduction=sample.log_prob_reduction,
            sde_type=sample.sde_type)

    def ode_step(self, model_output, timesteps, latents):
        return ode_step(self.scheduler, model_output, timesteps, latents)

    def noised(self, x0, noise, timesteps):
        sigma = (timesteps.float() / self.scheduler.config.num_train_timesteps).reshape(-1, *[1] * (x0.ndim - 1))
        return (1 - sigma) * x0 + sigma * noise, noise - x0

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        vae = self.pipe.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        image = vae.decode(latents).sample
        image = (image.float() / 2 + 0.5).clamp(0, 1)
        return (image.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()


class StableDiffusion3(FlowMatchFamily):
    class_names = ("StableDiffusion3Pipeline",)
    pipeline_class = StableDiffusion3Pipeline
    max_sequence_length = 256  # StableDiffusion3Pipeline's default

    def encode(self, prompts, with_negative):
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompts, None, None, device=self.text_encoder_device, num_images_per_prompt=1,
            do_classifier_free_guidance=with_negative, max_sequence_length=self.max_sequence_length)
        cond = {"prompt_embeds": embeds, "pooled": pooled}
        return cond, ({"prompt_embeds": negative, "pooled": negative_pooled} if with_negative else None)

    def forward(self, latents, timesteps, cond: Conditioning, guidance_scale):
        return self.denoiser(hidden_states=latents, timestep=timesteps, encoder_hidden_states=cond["prompt_embeds"],
                             pooled_projections=cond["pooled"]).sample
