"""Wan 2.1 text-to-video: a flow-matching transformer over 3D patches of a causal video VAE's
latents [B, C, f, h, w], on UMT5's text embeddings (zero-padded to `max_sequence_length`, so
every prompt's conditioning has one length), with classifier-free guidance on an empty negative
prompt. The Flow-GRPO SDE, its window and CPS step the 5-D latents as they step images
(ddpo/flow.py works on any shape); `decode` returns the clips as Media.

The published checkpoints ship a UniPC multistep scheduler (a predictor-corrector, not one
Gaussian step per action). `prepare` swaps in the Euler flow-matching scheduler with the same
shift (`flow_shift`), whose steps the SDE's are, so that WanPipeline itself samples as the run
does. Flow-GRPO instead keeps UniPC's sigma grid and steps it with its SDE; the Euler
scheduler's own grid differs from it in the last steps (20 steps: ..., 0.150, 0.009, 0 against
UniPC's ..., 0.139, 0). The VAE decodes in float32 whatever `model.dtype`, as the diffusers Wan
examples load it."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

from ddpo.families import Conditioning, videos_of_pixels
from ddpo.families.sd3 import FlowMatchFamily
from ddpo.media import Media


class Wan(FlowMatchFamily):
    class_names = ("WanPipeline",)
    pipeline_class = WanPipeline
    medium = "video"
    fps = 16  # Wan 2.1's clips: 81 frames are 5 s
    max_sequence_length = 512  # UMT5 tokens of a prompt, WanPipeline's default
    # the self- and cross-attention projections of every block (attn1, attn2): the LoRA of
    # Flow-GRPO's and DanceGRPO's Wan scripts (configs/wan21_1_3b.yaml)
    default_lora_targets = ["to_q", "to_k", "to_v", "to_out.0"]
    size_rule = "the VAE's spatial scale factor x the transformer's patch size, as WanPipeline checks"

    @classmethod
    def prepare(cls, pipe):
        if getattr(pipe, "transformer_2", None) is not None or pipe.config.get("expand_timesteps", False):
            raise ValueError("Wan 2.2's two-expert and per-token-timestep pipelines are not supported; "
                             "use a Wan 2.1 text-to-video model")
        scheduler = pipe.scheduler
        if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            if not scheduler.config.get("use_flow_sigmas", False):
                raise ValueError(f"scheduler {type(scheduler).__name__} is not a flow-matching schedule")
            pipe.scheduler = FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=scheduler.config.num_train_timesteps,
                shift=scheduler.config.get("flow_shift") or 1.0)
        cls.upcast(pipe.components)
        return super().prepare(pipe)

    @classmethod
    def upcast(cls, components):
        vae = components.get("vae")
        if vae is not None and vae.dtype != torch.float32:
            vae.float()  # not .to(dtype), which warns about float32 modules the VAE has none of

    @classmethod
    def vae_scale_factor(cls, vae_config) -> int:
        return vae_config["scale_factor_spatial"]

    @classmethod
    def latent_channels(cls, vae_config) -> int:
        return vae_config["z_dim"]

    @classmethod
    def size_multiple(cls, config_of) -> int:
        return cls.vae_scale_factor(config_of("vae")) * config_of("transformer")["patch_size"][1]

    @classmethod
    def frame_multiple(cls, config_of) -> int:
        return config_of("vae")["scale_factor_temporal"]

    def latent_shape(self, height: int, width: int, num_frames: int = 1) -> tuple[int, int, int, int]:
        scale, temporal = self.pipe.vae_scale_factor_spatial, self.pipe.vae_scale_factor_temporal
        return (self.latent_channels(self.pipe.vae.config), (num_frames - 1) // temporal + 1,
                height // scale, width // scale)

    @property
    def latent_dtype(self) -> torch.dtype:
        return torch.float32  # WanPipeline draws and steps its latents in float32 whatever the model's dtype

    def encode(self, prompts, with_negative):
        embeds, negative = self.pipe.encode_prompt(
            prompts, "" if with_negative else None, do_classifier_free_guidance=with_negative,
            max_sequence_length=self.max_sequence_length, device=self.text_encoder_device)
        return {"prompt_embeds": embeds}, ({"prompt_embeds": negative} if with_negative else None)

    def forward(self, latents, timesteps, cond: Conditioning, guidance_scale):
        embeds = cond["prompt_embeds"].to(self.denoiser.dtype)
        return self.denoiser(hidden_states=latents, timestep=timesteps, encoder_hidden_states=embeds,
                             return_dict=False)[0]

    @classmethod
    def meta_inputs(cls, denoiser, batch, shapes):
        config, dtype = denoiser.config, denoiser.dtype
        return {"hidden_states": torch.empty(batch, shapes.latent_channels, shapes.latent_frames, shapes.latent_height,
                                             shapes.latent_width, device="meta", dtype=dtype),
                "timestep": torch.empty(batch, device="meta"),
                "encoder_hidden_states": torch.empty(batch, shapes.text_tokens, config.text_dim, device="meta",
                                                     dtype=dtype)}

    @classmethod
    def meta_vae_input(cls, batch, shapes, dtype):
        return torch.empty(batch, shapes.latent_channels, shapes.latent_frames, shapes.latent_height,
                           shapes.latent_width, device="meta", dtype=dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> Media:
        vae = self.pipe.vae
        latents = latents.to(vae.dtype)
        view = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(view).to(latents.device, latents.dtype)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(view).to(latents.device, latents.dtype)
        video = vae.decode(latents / inverse_std + mean, return_dict=False)[0]  # as the pipeline: [B, 3, F, H, W]
        return videos_of_pixels(video, self.fps)
