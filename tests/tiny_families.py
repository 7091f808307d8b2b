"""Tiny SDXL, SD3, FLUX, Qwen-Image and Wan pipelines with random weights, built from configs in code
(the shapes of the real ones, the sizes of a unit test). 32x32 images are 16x16 latents."""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLQwenImage,
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)

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


# the words of QwenImagePipeline's prompt template (its system prompt and chat roles)
_QWEN_TEMPLATE_WORDS = ["system", "Describe", "the", "image", "by", "detailing", "color", "shape", "size", "texture",
                        "quantity", "text", "spatial", "relationships", "of", "objects", "and", "background", "user",
                        "assistant"]


def qwen_chat_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with Qwen's chat tokens, on which QwenImagePipeline's prompt template
    takes 34 tokens before the prompt, as on Qwen2.5-VL's own (the pipeline drops the first
    `prompt_template_encode_start_idx = 34` hidden states): one token per word, punctuation run
    and newline, and <|im_start|> / <|im_end|> whole."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]"]
    words = dict.fromkeys([*_QWEN_TEMPLATE_WORDS, *_TINY_VOCAB, ",", ":", "\n"])
    tokenizer = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate([*specials, *words])}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]+|\n"), behavior="removed", invert=True)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="[UNK]", additional_special_tokens=["<|im_start|>", "<|im_end|>"],
                                   model_max_length=2048)


def build_tiny_qwenimage(seed: int = 0) -> QwenImagePipeline:
    """Qwen-Image in miniature: a 2-layer Qwen2.5-VL text encoder (hidden 32, the multimodal
    rope's sections 1+1+2 of a head's 4 frequencies), a video VAE with one 2x downsampling and
    its latents' mean/std normalisation, a 2-block transformer on 2x2-packed latents, and
    Qwen-Image's scheduler config (dynamic exponential shift, terminal sigma 0.02)."""
    torch.manual_seed(seed)
    tokenizer = qwen_chat_tokenizer()
    n = len(tokenizer)
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config={"vocab_size": n, "hidden_size": HIDDEN, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]},
                     "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None,
                     "eos_token_id": tokenizer.eos_token_id},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                       "out_hidden_size": HIDDEN, "fullatt_block_indexes": [0]},
        # the vision tokens lie outside the tiny vocabulary: the pipeline never passes an image
        image_token_id=n, video_token_id=n + 1, vision_start_token_id=n + 2, vision_end_token_id=n + 3))
    vae = AutoencoderKLQwenImage(base_dim=16, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 1.2, 2.0])
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=4 * 4, out_channels=4, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2,
                                              joint_attention_dim=HIDDEN, axes_dims_rope=(4, 6, 6))
    # Qwen/Qwen-Image's scheduler_config.json
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, time_shift_type="exponential", base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift=1.0, shift_terminal=0.02)
    for module in (text_encoder, vae, transformer):
        module.eval()  # as from_pretrained leaves them
    return QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)


def build_tiny_wan(seed: int = 0) -> WanPipeline:
    """Wan 2.1 text-to-video in miniature: a 2-layer UMT5 text encoder, a causal video VAE with
    one 2x downsampling in space and in time (clips of 2k + 1 frames; Wan's has 8x and 4x) and
    its latents' mean/std normalisation, a 2-block transformer on (1, 2, 2) patches, and Wan
    2.1's published scheduler, UniPC on flow sigmas with flow_shift 3 (which the family swaps for
    the Euler flow-matching scheduler)."""
    torch.manual_seed(seed)
    tokenizer = word_level_tokenizer(_TINY_VOCAB)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=HIDDEN, d_kv=8, d_ff=64,
                                               num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                               pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True],
                           latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 1.2, 2.0],
                           scale_factor_spatial=2, scale_factor_temporal=2)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=4, out_channels=4, text_dim=HIDDEN, freq_dim=32, ffn_dim=32,
                                        num_layers=2, rope_max_seq_len=32)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                        num_train_timesteps=1000)
    for module in (text_encoder, vae, transformer):
        module.eval()  # as from_pretrained leaves them
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=scheduler)


BUILDERS = {"sdxl": build_tiny_sdxl, "sd3": build_tiny_sd3, "flux": build_tiny_flux, "qwenimage": build_tiny_qwenimage,
            "wan": build_tiny_wan}
