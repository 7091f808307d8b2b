"""Tiny SDXL, SD3 and FLUX pipelines with random weights, built from configs in code (the shapes
of the real ones, the sizes of a unit test). 32x32 images are 16x16 latents."""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from ddpo.pipeline import _TINY_VOCAB, sd_scheduler, word_level_tokenizer

HIDDEN = 32  # every text encoder's width and projection


def _clip(tokenizer, with_projection: bool):
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=64, projection_dim=HIDDEN,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)


def _vae(**config):
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                         block_out_channels=(32, 64), norm_num_groups=8,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         **config)


def build_tiny_sdxl(seed: int = 0) -> StableDiffusionXLPipeline:
    torch.manual_seed(seed)
    tokenizer = word_level_tokenizer(_TINY_VOCAB)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
        cross_attention_dim=2 * HIDDEN,  # the two encoders' hidden states, concatenated
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + HIDDEN,  # 6 time ids + the pooled embedding
    )
    return StableDiffusionXLPipeline(
        vae=_vae(force_upcast=True), text_encoder=_clip(tokenizer, False), text_encoder_2=_clip(tokenizer, True),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=sd_scheduler())


def build_tiny_sd3(seed: int = 0) -> StableDiffusion3Pipeline:
    torch.manual_seed(seed)
    tokenizer = word_level_tokenizer(_TINY_VOCAB)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=2 * HIDDEN,
        pooled_projection_dim=2 * HIDDEN, pos_embed_max_size=16)
    return StableDiffusion3Pipeline(
        transformer=transformer, vae=_vae(shift_factor=0.06, scaling_factor=1.5),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=_clip(tokenizer, True), tokenizer=tokenizer,
        text_encoder_2=_clip(tokenizer, True), tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None)  # no T5: its tokens are zeros


def build_tiny_flux(seed: int = 0) -> FluxPipeline:
    torch.manual_seed(seed)
    tokenizer = word_level_tokenizer(_TINY_VOCAB)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=HIDDEN, d_kv=8, d_ff=64, num_layers=2,
                                 num_heads=4, decoder_start_token_id=0, pad_token_id=tokenizer.pad_token_id))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=HIDDEN, pooled_projection_dim=HIDDEN,
        axes_dims_rope=(4, 4, 8), guidance_embeds=True)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(
        transformer=transformer, vae=_vae(shift_factor=0.1, scaling_factor=0.4), scheduler=scheduler,
        text_encoder=_clip(tokenizer, False), tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer)


BUILDERS = {"sdxl": build_tiny_sdxl, "sd3": build_tiny_sd3, "flux": build_tiny_flux}
