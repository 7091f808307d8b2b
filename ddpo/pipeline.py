"""Loading the diffusion pipeline: a diffusers folder or hub id, a tiny one built in code, or an
embedded one shipped in `ddpo/assets/`. Whatever the source, its family comes from its
`model_index.json` (a builtin built in code: the one of the pipeline it builds)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import logging as diffusers_logging
from huggingface_hub.utils import are_progress_bars_disabled
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from ddpo.errors import ConfigError, DeviceError, ModelLoadError, one_line
from ddpo.families import ModelFamily, PromptCache, family_named

BUILTIN_TINY = "builtin:tiny"
# embedded diffusers folders, loaded through the same from_pretrained path as any other folder
BUILTIN_FOLDERS = {
    # a tiny text-to-image model of scikit-learn's digits (scripts/train_digits.py)
    "builtin:digits": Path(__file__).resolve().parent / "assets" / "digits",
    # its flow-matching twin: a tiny StableDiffusion3Pipeline (SD3 transformer, two CLIP encoders,
    # no T5) on the same VAE and text encoder, trained by rectified flow (same script)
    "builtin:digits-flow": Path(__file__).resolve().parent / "assets" / "digits-flow",
    # a tiny text-to-video model of the same digits moving left, right, up or down: a WanPipeline
    # (causal video VAE, UMT5 text encoder, Wan transformer), trained by rectified flow (same script)
    "builtin:digits-video": Path(__file__).resolve().parent / "assets" / "digits-video",
}
# the T5 sequence length (`model.max_sequence_length`) a builtin model was trained with, where it
# is not its pipeline's default: digits-flow has no T5 and was trained on one zero "T5 token"
# after its 8 CLIP tokens (scripts/train_digits.py's `flow.max_sequence_length`); digits-video's
# UMT5 embeddings were zero-padded to 8 tokens, its longest prompt (`video.max_sequence_length`)
BUILTIN_MAX_SEQUENCE_LENGTH = {"builtin:digits-flow": 1, "builtin:digits-video": 8}

# Words the tiny tokenizer knows; anything else maps to [UNK]. Enough for the default prompts
# and tests; the tiny model is random, so its vocabulary only needs to tell prompts apart.
_TINY_VOCAB = (
    "a an the of in on with and photo picture painting drawing image "
    "cat dog horse bird fish cow sheep pig rabbit fox lion tiger bear monkey elephant "
    "red green blue yellow black white small big "
    "zero one two three four five six seven eight nine digit handwritten "
    "riding bike playing chess washing dishes"
).split()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_device_here(device: str, field: str, hint: str) -> None:
    """A model that runs in this process (or a local Ray instance) needs its device here: a
    one-line error naming `field` instead of a CUDA traceback from the first `.to(device)`."""
    kind, _, index = device.partition(":")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"{field}: '{device}' but this machine has no CUDA device ({hint})")
        if index and int(index) >= count:
            raise DeviceError(f"{field}: '{device}' but this machine has {count} CUDA device"
                              f"{'s' if count > 1 else ''} (cuda:0 to cuda:{count - 1})")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"{field}: 'mps' but this machine has no MPS device ({hint})")


def word_level_tokenizer(words: list[str], model_max_length: int = 77) -> PreTrainedTokenizerFast:
    """A CLIP-shaped tokenizer over a fixed word list (one token per whitespace-separated word,
    anything else [UNK]), usable as a StableDiffusionPipeline's tokenizer. The pipelines pad and
    cut prompts to `model_max_length` tokens (CLIP's 77)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<|startoftext|>", "<|endoftext|>", "[UNK]"]
    vocab = {token: i for i, token in enumerate(specials + list(words))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="[UNK]",
        model_max_length=model_max_length,
    )


def build_tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A Stable-Diffusion-shaped pipeline with tiny random weights (deterministic in `seed`):
    UNet with block_out_channels (32, 64), a 2x VAE, a 2-layer CLIP text encoder, and the
    SD scheduler settings. 32x32 images are 16x16 latents."""
    torch.manual_seed(seed)
    tokenizer = word_level_tokenizer(_TINY_VOCAB)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    )
    # in eval mode, as from_pretrained leaves a loaded pipeline: in train mode a VAE convolution
    # sees its input in another memory layout, and PyTorch's plain kernels round it otherwise
    for module in (unet, vae, text_encoder):
        module.eval()
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sd_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def sd_scheduler() -> DDIMScheduler:
    """DDIM with Stable Diffusion's noise schedule (scaled-linear betas 0.00085..0.012)."""
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )


# builtin models built in code, by name: a function of the seed that builds the pipeline
BUILTIN_BUILDERS = {BUILTIN_TINY: build_tiny_pipeline}


def meta_pipeline(pretrained: str):
    """A builtin model built in code (BUILTIN_BUILDERS) on the meta device: its components'
    configs and shapes without weights, the global random state left as it was. None for any
    other model."""
    build = BUILTIN_BUILDERS.get(pretrained)
    if build is None:
        return None
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return build()


def check_pretrained(pretrained: str, revision: str | None = None) -> str:
    """Fail fast, in one line, when `model.pretrained` names nothing loadable: a local folder
    must hold a diffusers `model_index.json`; a hub id must resolve (or be in the local cache).
    Returns the source to hand to `load_pipeline` (builtin names stay as they are)."""
    if pretrained in BUILTIN_BUILDERS:
        return pretrained
    if pretrained in BUILTIN_FOLDERS:
        check_pretrained(str(BUILTIN_FOLDERS[pretrained]))
        return pretrained
    if pretrained.startswith("builtin:"):
        raise ModelLoadError(f"model.pretrained: unknown '{pretrained}'; the builtin models are "
                             f"{[*BUILTIN_BUILDERS, *BUILTIN_FOLDERS]}")
    local = Path(pretrained).expanduser()
    if local.exists() or pretrained.startswith((".", "/", "~")) or pretrained.count("/") > 1:
        if not (local / "model_index.json").is_file():
            raise ModelLoadError(
                f"model.pretrained: '{pretrained}' is not a diffusers pipeline folder "
                "(no model_index.json there)"
            )
        return str(local.resolve())
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(pretrained, "model_index.json", revision=revision)
    except Exception as err:  # offline, unknown repo, gated, ...: many types, one line
        raise ModelLoadError(
            f"model.pretrained: '{pretrained}' is neither a local diffusers folder nor reachable "
            f"on the Hugging Face Hub ({one_line(err)})"
        ) from None
    return pretrained


def load_pipeline(
    pretrained: str,
    revision: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    seed: int = 0,
    max_sequence_length: int | None = None,
) -> ModelFamily:
    """The frozen pipeline for sampling and training, behind its family's adapter
    (`ddpo.families`), on `device` in `dtype`; `max_sequence_length` (`model.max_sequence_length`):
    the T5 tokens of a prompt (SD3, FLUX), None for the length a builtin model was trained with or
    else the pipeline's default. Raises ModelLoadError with a one-line message."""
    torch_dtype = getattr(torch, dtype)
    if max_sequence_length is None:
        max_sequence_length = BUILTIN_MAX_SEQUENCE_LENGTH.get(pretrained)
    if pretrained in BUILTIN_BUILDERS:
        pipe = BUILTIN_BUILDERS[pretrained](seed)
        if torch_dtype != torch.float32:
            pipe.to(dtype=torch_dtype)
        family = _family_in(pretrained, {"_class_name": type(pipe).__name__})
    else:
        source = check_pretrained(pretrained, revision)
        source = str(BUILTIN_FOLDERS.get(source, source))
        index = model_index(source, revision)
        family = _family_in(pretrained, index)
        # components the folder does without (SD3 without T5): from_pretrained wants them named
        absent = {name: None for name, entry in index.items() if isinstance(entry, list) and entry[0] is None}
        verbosity, bars = diffusers_logging.get_verbosity(), diffusers_logging.is_progress_bar_enabled()
        diffusers_logging.set_verbosity_error()
        if are_progress_bars_disabled():  # HF_HUB_DISABLE_PROGRESS_BARS, which transformers follows too
            diffusers_logging.disable_progress_bar()
        try:
            pipe = family.pipeline_class.from_pretrained(source, revision=revision, dtype=torch_dtype,
                                                         **{**absent, **family.load_kwargs})
        except Exception as err:  # a broken folder or download: many types, one line
            raise ModelLoadError(
                f"model.pretrained: cannot load '{pretrained}' as a {family.pipeline_class.__name__} "
                f"({one_line(err)})"
            ) from None
        finally:
            diffusers_logging.set_verbosity(verbosity)
            if bars:
                diffusers_logging.enable_progress_bar()
    try:
        pipe = family.prepare(pipe)
    except ValueError as err:  # a scheduler setting the family cannot step with
        raise ModelLoadError(f"model.pretrained: '{pretrained}': {err}") from None
    if max_sequence_length is None:
        model = family(pipe)
    elif hasattr(family, "max_sequence_length"):
        model = family(pipe, max_sequence_length=max_sequence_length)
    else:
        raise ModelLoadError(f"model.max_sequence_length: '{pretrained}' is a {type(pipe).__name__}, which has "
                             "no T5 sequence length (SD3 and FLUX have one); leave it unset")
    for module in model.frozen_modules():
        module.requires_grad_(False)
    pipe.to(resolve_device(device))
    return model


def model_index(source: str, revision: str | None = None) -> dict:
    """A diffusers pipeline's model_index.json: a local folder's, a hub repo's, a builtin's (its
    folder's, or for one built in code, that of the pipeline it builds)."""
    built = meta_pipeline(source)
    if built is not None:
        return {"_class_name": type(built).__name__,
                **{k: list(v) if isinstance(v, tuple) else v for k, v in built.config.items() if not k.startswith("_")}}
    source = str(BUILTIN_FOLDERS.get(source, source))
    if Path(source).is_dir():
        return json.loads((Path(source) / "model_index.json").read_text())
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(source, "model_index.json", revision=revision)).read_text())


def component_config(source: str, name: str, revision: str | None = None) -> Mapping[str, Any]:
    """The config of one of a pipeline's components (`vae`, `unet`, ...), from wherever
    `model_index` reads the pipeline's."""
    built = meta_pipeline(source)
    if built is not None:
        return dict(getattr(built, name).config)
    source = str(BUILTIN_FOLDERS.get(source, source))
    if Path(source).is_dir():
        return json.loads((Path(source) / name / "config.json").read_text())
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(source, f"{name}/config.json", revision=revision)).read_text())


def _family_in(pretrained: str, index: dict) -> type[ModelFamily]:
    """The family of a pipeline folder's model_index.json; a ModelLoadError naming
    `model.pretrained` where no family serves its pipeline class."""
    try:
        return family_named(index.get("_class_name", "?"))
    except ValueError as err:
        raise ModelLoadError(f"model.pretrained: '{pretrained}': {err}") from None


def check_family_settings(config, model: ModelFamily | None = None) -> None:
    """Refuse, with a ConfigError naming the field, settings that the model's family cannot
    honour (`ModelFamily.check_config`: another step's settings, DiffusionNFT on a DDIM model,
    an image size off its multiple, a clip length off its frame rule). Without `model` (before
    it loads) it reads the model's configs alone: its model_index.json and its components'
    config.json."""
    pretrained, revision = config.model.pretrained, config.model.revision
    if model is None:
        family = _family_in(pretrained, model_index(pretrained, revision))

        def config_of(name):
            return component_config(pretrained, name, revision)
    else:
        family = type(model)

        def config_of(name):
            return getattr(model.pipe, name).config
    try:
        multiple, frames = family.size_multiple(config_of), family.frame_multiple(config_of)
    except Exception:  # a hub model's configs out of reach here: its sizes are checked where it loads
        if model is not None:
            raise
        multiple = frames = None
    try:
        family.check_config(config, multiple, frames)
    except ConfigError as err:
        raise ConfigError(f"{err} (model.pretrained '{pretrained}' is a {family.__name__} model)") from None


def load_policy(config) -> ModelFamily:
    """The policy p_theta: the frozen pipeline of `config.model` with the LoRA adapter of
    `config.lora` on its denoiser (the same initial adapter everywhere, from `config.seed`), its
    prompt cache of `model.prompt_cache_size` prompts, and with `model.offload_text_encoders`, the
    run's prompts encoded and the text encoders moved to the CPU."""
    from ddpo.lora import attach_lora

    model = load_pipeline(config.model.pretrained, config.model.revision, config.model.device,
                          config.model.dtype, seed=config.seed,
                          max_sequence_length=config.model.max_sequence_length)
    check_family_settings(config, model)
    lora = config.lora
    attach_lora(model.denoiser, lora.rank, lora.alpha, lora.target_modules or model.default_lora_targets,
                seed=config.seed)
    model.prompt_cache = PromptCache(config.model.prompt_cache_size)
    if config.model.offload_text_encoders:
        model.offload_text_encoders(config.load_prompts(), with_negative=model.uses_cfg(config.sample.guidance_scale))
    return model
