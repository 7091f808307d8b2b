"""Stable Diffusion 3 / 3.5: a flow-matching transformer (MMDiT) on two CLIP text encoders and an
optional T5, stepped with Flow-GRPO's SDE (ddpo/flow.py)."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import StableDiffusion3Pipeline

from ddpo.config import SampleConfig
from ddpo.gaussian import GaussianStep
from ddpo.families import Conditioning, ModelFamily, images_of_pixels
from ddpo.flow import ode_step, sde_step_with_logprob
from ddpo.media import Media


class FlowMatchFamily(ModelFamily):
    """What the flow-matching transformers share: a FlowMatchEulerDiscreteScheduler schedule,
    the SDE step (Flow-GRPO's or CPS), the ODE step outside an SDE window, x_t = (1 - sigma) x_0 +
    sigma eps with velocity v = eps - x_0."""

    denoiser_name = "transformer"
    step_settings = "flow"  # sample.flow: noise_level, sde_type, the SDE window
    step_name = "the flow SDE"
    size_rule = "the VAE's scale factor x the transformer's patch_size, as StableDiffusion3Pipeline checks"
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

    def latent_shape(self, height: int, width: int, num_frames: int = 1) -> tuple[int, int, int]:
        scale = self.pipe.vae_scale_factor
        return self.latent_channels(self.pipe.vae.config), height // scale, width // scale

    @classmethod
    def text_tokens(cls, clip_tokens, sequence_length):
        return sequence_length  # the T5 (or other) encoder's alone, as FLUX and Qwen-Image

    @classmethod
    def size_multiple(cls, config_of) -> int:
        return cls.vae_scale_factor(config_of("vae")) * config_of(cls.denoiser_name)["patch_size"]

    def step(self, model_output, timesteps, latents, sample: SampleConfig, prev_sample=None,
             generator=None) -> GaussianStep:
        return sde_step_with_logprob(
            self.scheduler, model_output, timesteps, latents, noise_level=sample.flow.noise_level,
            prev_sample=prev_sample, generator=generator, log_prob_reduction=sample.log_prob_reduction,
            sde_type=sample.flow.sde_type)

    def ode_step(self, model_output, timesteps, latents):
        return ode_step(self.scheduler, model_output, timesteps, latents)

    def noised(self, x0, noise, timesteps):
        sigma = (timesteps.float() / self.scheduler.config.num_train_timesteps).reshape(-1, *[1] * (x0.ndim - 1))
        return (1 - sigma) * x0 + sigma * noise, noise - x0

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> Media:
        vae = self.pipe.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        image = vae.decode(latents).sample
        return images_of_pixels(image)


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

    @classmethod
    def text_tokens(cls, clip_tokens, sequence_length):
        return clip_tokens + sequence_length  # CLIP's, then T5's (zeros without T5)

    @classmethod
    def meta_inputs(cls, denoiser, batch, shapes):
        config, dtype = denoiser.config, denoiser.dtype
        return {"hidden_states": torch.empty(batch, shapes.latent_channels, shapes.latent_height, shapes.latent_width,
                                             device="meta", dtype=dtype),
                "timestep": torch.empty(batch, device="meta"),
                "encoder_hidden_states": torch.empty(batch, shapes.text_tokens, config.joint_attention_dim,
                                                     device="meta", dtype=dtype),
                "pooled_projections": torch.empty(batch, config.pooled_projection_dim, device="meta", dtype=dtype)}
