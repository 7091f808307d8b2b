"""Model families behind one seam. The sampler and the learner never touch a UNet or a
transformer directly: they ask a family adapter to encode prompts, predict (with guidance), step
with a log-prob, and decode.

A family is one module of this package with one `ModelFamily` subclass that names the diffusers
pipeline classes it serves (`class_names`, as in a pipeline folder's `model_index.json`).
Adding a family is adding a file here: the registry below finds it. The family owns all that
differs between families: its conditioning (any keys, sequences of any length with their
attention masks), its step and the settings it reads (`sample.ddim`, `sample.flow`), its image
size rule, its latents' shape and dtype, and decoding (tests/test_family_seam.py holds that).

Latents have the shape and dtype the family gives them (`latent_shape`, `latent_dtype`): the
rollout, the Gaussian steps and their log-probs work on any. The shipped families keep them
unpacked, [B, C, h, w] (FLUX and Qwen-Image pack 2x2 patches inside their forward), and a video
family's [B, C, f, h, w] (Wan).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers.utils.torch_utils import randn_tensor

from ddpo.config import Config, ModelConfig, SampleConfig
from ddpo.errors import ConfigError
from ddpo.gaussian import GaussianStep
from ddpo.media import Media

# a prompt's conditioning: tensors with the batch first (text embeddings, pooled embeddings, ...)
Conditioning = dict[str, torch.Tensor]


def take(cond: Conditioning | None, rows: torch.Tensor) -> Conditioning | None:
    return None if cond is None else {k: v[rows.to(v.device)] for k, v in cond.items()}


def concat(conds: list[Conditioning | None], masks: Mapping[str, str] = {}) -> Conditioning | None:
    """The conditionings joined along the batch. A token sequence may differ in length from one
    to the next (a text encoder that pads to its batch's longest prompt, as Qwen-Image's) where
    it has an attention mask: `masks` maps the sequence's key to its mask's key (1 a token, 0
    padding). Such a sequence and its mask are padded with zeros at the end to the longest, so
    the padding is never attended to. Equal shapes are joined unchanged; unequal ones without a
    mask are a ValueError (zeros there would be attended to)."""
    if conds[0] is None:
        return None
    padded_keys = {*masks, *masks.values()}

    def padded(v: torch.Tensor, length: int) -> torch.Tensor:
        if v.shape[1] == length:
            return v
        return torch.cat([v, v.new_zeros(v.shape[0], length - v.shape[1], *v.shape[2:])], dim=1)

    joined = {}
    for k in conds[0]:
        parts = [c[k] for c in conds]
        if len({v.shape[1:] for v in parts}) == 1:
            joined[k] = torch.cat(parts)
            continue
        if k not in padded_keys or parts[0].ndim < 2 or len({(v.ndim, *v.shape[2:]) for v in parts}) != 1:
            raise ValueError(f"conditioning '{k}': shapes {sorted({tuple(v.shape[1:]) for v in parts})} differ and "
                             "no attention mask says which tokens are padding (ModelFamily.sequence_masks)")
        if k in masks and masks[k] not in conds[0]:
            raise ValueError(f"conditioning '{k}': its attention mask '{masks[k]}' is not in the conditioning")
        length = max(v.shape[1] for v in parts)
        joined[k] = torch.cat([padded(v, length) for v in parts])
    return joined


NEGATIVE = None  # the prompt cache's key of the empty prompt's conditioning (classifier-free guidance)


class PromptCache:
    """Conditioning rows (batch 1) by prompt: the `size` most recently used, and the rows kept for
    the whole run whatever their use (the run's prompts, once the text encoders are offloaded).
    The key NEGATIVE holds the empty prompt's conditioning."""

    def __init__(self, size: int):
        self.size = size
        self.recent: OrderedDict[str | None, Conditioning] = OrderedDict()
        self.kept: dict[str | None, Conditioning] = {}

    def get(self, prompt: str | None) -> Conditioning | None:
        if prompt in self.kept:
            return self.kept[prompt]
        if prompt in self.recent:
            self.recent.move_to_end(prompt)
        return self.recent.get(prompt)

    def put(self, prompt: str | None, row: Conditioning) -> None:
        """Keep `row` as the most recent; past `size` rows, the least recently used one leaves."""
        if self.size == 0:
            return
        self.recent[prompt] = row
        self.recent.move_to_end(prompt)
        while len(self.recent) > self.size:
            self.recent.popitem(last=False)


def _moved(row: Conditioning, device: torch.device) -> Conditioning:
    return {k: v.to(device) for k, v in row.items()}


def _uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] as uint8, rounded as the pipelines' `numpy_to_pil` does."""
    return ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


def images_of_pixels(pixels: torch.Tensor) -> Media:
    """A VAE's decoded pixels [B, 3, H, W] in [-1, 1] as uint8 images."""
    return Media.from_images(_uint8(pixels).permute(0, 2, 3, 1).cpu().numpy())


def videos_of_pixels(pixels: torch.Tensor, fps: float) -> Media:
    """A video VAE's decoded pixels [B, 3, F, H, W] in [-1, 1] as uint8 clips at `fps`."""
    return Media.from_videos(_uint8(pixels).permute(0, 2, 3, 4, 1).cpu().numpy(), fps)


class ModelFamily:
    """One family of text-to-image pipelines. Subclasses give the class attributes and the
    methods that raise NotImplementedError; the rest is shared."""

    class_names: ClassVar[tuple[str, ...]] = ()  # the pipelines' `_class_name`s
    medium: ClassVar[str] = "image"  # what `decode` makes: image, or video (ddpo.media)
    pipeline_class: ClassVar[type]  # the diffusers pipeline class that loads the folder
    denoiser_name: ClassVar[str] = "unet"  # the module that carries the LoRA ("unet", "transformer")
    default_lora_targets: ClassVar[list[str]] = ["to_q", "to_k", "to_v", "to_out.0"]
    load_kwargs: ClassVar[dict] = {}  # extra `from_pretrained` arguments
    # the settings its `step` reads: a section of SampleConfig ("ddim", "flow"); the other
    # sections must keep their defaults (`check_config`)
    step_settings: ClassVar[str]
    step_name: ClassVar[str]  # the step in messages ("DDIM", "the flow SDE")
    # token sequences of the conditioning that may differ in length between prompts, each with
    # the key of its attention mask (1 a token, 0 padding): joined by `concat`, padded with zeros
    sequence_masks: ClassVar[dict[str, str]] = {}
    # what sample.height and sample.width must be multiples of, in words (`size_multiple`)
    size_rule: ClassVar[str] = "one latent pixel per vae_scale_factor pixels"

    def __init__(self, pipe):
        self.pipe = pipe
        self.prompt_cache = PromptCache(ModelConfig.prompt_cache_size)

    @classmethod
    def prepare(cls, pipe):
        """The loaded pipeline made ready to sample and train (scheduler, no progress bars)."""
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_name)

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def scheduler(self):
        return self.pipe.scheduler

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [m for m in self.pipe.components.values() if isinstance(m, torch.nn.Module)]

    # -- what every family does its own way ---------------------------------------------------

    def set_timesteps(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        """Put the sampling schedule into the scheduler; returns its timesteps."""
        raise NotImplementedError

    def encode(self, prompts: list[str], with_negative: bool) -> tuple[Conditioning, Conditioning | None]:
        """The prompts' conditioning and, for classifier-free guidance, the empty prompt's."""
        raise NotImplementedError

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                guidance_scale: float) -> torch.Tensor:
        """The denoiser's raw output (noise, velocity) for latents [B, C, h, w] at timesteps [B]."""
        raise NotImplementedError

    def step(self, model_output: torch.Tensor, timesteps: torch.Tensor, latents: torch.Tensor,
             sample: SampleConfig, prev_sample: torch.Tensor | None = None,
             generator=None) -> GaussianStep:
        """One stochastic step with the log-prob of its action (ddpo/ddim.py, ddpo/flow.py), with
        the settings of `sample.<step_settings>`."""
        raise NotImplementedError

    def ode_step(self, model_output: torch.Tensor, timesteps: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """One deterministic step of the probability-flow ODE (outside an SDE window)."""
        raise NotImplementedError

    @classmethod
    def check_config(cls, config: Config, size_multiple: int | None = None,
                     frame_multiple: int | None = None) -> None:
        """Refuse, in one line (a ConfigError naming the field), settings this family cannot
        honour: another kind of step's settings away from their defaults, DiffusionNFT without
        a flow-matching step, and, given the model's `size_multiple` and `frame_multiple`, an
        image size or clip length off them (an image family: more than one frame)."""
        for kind, settings in step_settings_of(config.sample).items():
            changed = changed_settings(settings)
            if kind != cls.step_settings and changed:
                raise ConfigError(f"sample.{kind}.{changed[0]}: {cls.__name__} steps with {cls.step_name} "
                                  f"(sample.{cls.step_settings}) and reads no sample.{kind} setting; remove it")
        if config.train.algorithm == "diffusion_nft" and cls.step_settings != "flow":
            raise ConfigError(f"train.algorithm: diffusion_nft trains flow-matching models (SD3, FLUX, Qwen-Image); "
                              f"{cls.__name__} steps with {cls.step_name}: use ddpo_is, ddpo_sf or rwr")
        for key in ("height", "width") if size_multiple else ():
            value = getattr(config.sample, key)
            if value % size_multiple:
                raise ConfigError(f"sample.{key}: must be a multiple of {size_multiple} for {cls.__name__} "
                                  f"({cls.size_rule}), got {value}")
        frames = config.sample.num_frames
        if cls.medium == "image" and frames != 1:
            raise ConfigError(f"sample.num_frames: {cls.__name__} makes images (one frame); remove it or set 1, "
                              f"got {frames}")
        if cls.medium == "video" and frame_multiple and (frames - 1) % frame_multiple:
            raise ConfigError(f"sample.num_frames: must be {frame_multiple}k + 1 for {cls.__name__} (one latent "
                              f"frame for the first, one per {frame_multiple} after it), got {frames}")

    @classmethod
    def vae_scale_factor(cls, vae_config: Mapping[str, Any]) -> int:
        """Image pixels per latent pixel, from the VAE's config as the pipelines compute it: one
        2x downsampling between each two of its blocks."""
        return 2 ** (len(vae_config["block_out_channels"]) - 1)

    @classmethod
    def size_multiple(cls, config_of: Callable[[str], Mapping[str, Any]]) -> int:
        """What sample.height and sample.width must be multiples of: the pipeline's own rule
        (`size_rule`), from its components' configs (`config_of("vae")`, the config of the
        pipeline's `vae`; read from the model's folder before it loads, or from the loaded one)."""
        return cls.vae_scale_factor(config_of("vae"))

    @classmethod
    def frame_multiple(cls, config_of: Callable[[str], Mapping[str, Any]]) -> int | None:
        """A video family's frames per latent frame after the first (sample.num_frames must be
        k * this + 1), from its components' configs as `size_multiple`; None for an image family."""
        return None

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        """(x_t, the denoiser's training target) for the ordinary denoising loss (RWR)."""
        raise NotImplementedError

    def latent_shape(self, height: int, width: int, num_frames: int = 1) -> tuple[int, ...]:
        """One sample's latents (without the batch) for an image of `height` x `width` (a video
        family: a clip of `num_frames` such frames)."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> Media:
        """x_0 latents -> the samples in the family's `medium` (`images_of_pixels` for images)."""
        raise NotImplementedError

    # -- the model as the memory plan traces it on the meta device (ddpo/memory.py) ---------
    # `shapes` is a ddpo.memory.Shapes: latent_channels, latent_height, latent_width, text_tokens,
    # latent_frames (a video family's)

    @classmethod
    def meta_inputs(cls, denoiser: torch.nn.Module, batch: int, shapes) -> dict:
        """The denoiser's keyword arguments as `forward` passes them, empty tensors on the meta
        device at the run's shapes."""
        raise NotImplementedError

    @classmethod
    def meta_conditioning(cls, inputs: dict) -> list[torch.Tensor]:
        """The tensors of `meta_inputs` that a prompt's conditioning row holds (the prompt cache)."""
        return [v for k, v in inputs.items() if k in ("encoder_hidden_states", "pooled_projections") and v is not None]

    @classmethod
    def meta_vae_input(cls, batch: int, shapes, dtype: torch.dtype) -> torch.Tensor:
        """What `decode` passes the VAE's decode, an empty tensor on the meta device."""
        return torch.empty(batch, shapes.latent_channels, shapes.latent_height, shapes.latent_width, device="meta",
                           dtype=dtype)

    @classmethod
    def latent_channels(cls, vae_config: Mapping[str, Any]) -> int:
        """The channels of the VAE's latents, from its config."""
        return vae_config["latent_channels"]

    @classmethod
    def text_tokens(cls, clip_tokens: int, sequence_length: int | None) -> int:
        """The conditioning's tokens as the denoiser sees them, from the CLIP encoder's
        (`clip_tokens`) and the other encoder's (T5, Qwen2.5-VL: `model.max_sequence_length`,
        else the family's): CLIP's here."""
        return clip_tokens

    @classmethod
    def upcast(cls, components: Mapping[str, Any]) -> None:
        """Move to float32 the components this family never runs in a lower `model.dtype` (at
        load, in `prepare`; and on the memory plan's modules): none here."""

    # -- shared ----------------------------------------------------------------------------

    def uses_cfg(self, guidance_scale: float) -> bool:
        """Whether guidance runs the denoiser twice (classifier-free guidance)."""
        return guidance_scale > 1.0

    @property
    def latent_dtype(self) -> torch.dtype:
        """The dtype x_T is drawn in and a trajectory's latents are kept in: the denoiser's
        (`model.dtype`), the dtype of the pipelines' prompt embeddings, which they draw x_T in."""
        return self.denoiser.dtype

    def concat(self, conds: list[Conditioning | None]) -> Conditioning | None:
        """The conditionings joined along the batch, sequences of unequal length padded by their
        masks (`concat`, `sequence_masks`)."""
        return concat(conds, self.sequence_masks)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the denoiser's activations in the backward pass instead of keeping them
        (`train.gradient_checkpointing`): the same gradients for less memory and about one more
        forward. Forwards without gradients (sampling, the proximal and reference log-probs) are
        unchanged."""
        denoiser = self.denoiser
        if not getattr(denoiser, "_supports_gradient_checkpointing", False):
            raise ConfigError(f"train.gradient_checkpointing: the {type(denoiser).__name__} of {type(self).__name__} "
                              "does not support gradient checkpointing; set it to false")
        denoiser.enable_gradient_checkpointing()

    # -- the frozen text encoders: each prompt encoded once per run -------------------------

    def text_encoders(self) -> dict[str, torch.nn.Module]:
        """The pipeline's text encoders by component name (text_encoder, text_encoder_2, ...)."""
        return {name: module for name, module in self.pipe.components.items()
                if name.startswith("text_encoder") and isinstance(module, torch.nn.Module)}

    @property
    def text_encoder_device(self) -> torch.device:
        """Where `encode` runs: the text encoders' device (the CPU once they are offloaded)."""
        encoders = list(self.text_encoders().values())
        return next(encoders[0].parameters()).device if encoders else self.device

    @torch.no_grad()
    def conditioning(self, prompts: list[str], with_negative: bool) -> tuple[Conditioning, Conditioning | None]:
        """What `encode` returns, on the model's device, with each prompt's row from the prompt
        cache: the text encoders are frozen, so a prompt is encoded once per run and sampling and
        training reuse its row. A prompt the cache lacks is encoded alone, never beside others:
        batched matmuls round a row differently with other rows beside it, and alone a row is
        the same bits whatever batch asks for it, in a sampler and in a learner, before and after
        a restart."""
        rows = {prompt: self._row(prompt) for prompt in dict.fromkeys(prompts)}
        cond = self.concat([_moved(rows[prompt], self.device) for prompt in prompts])
        negative = self._row(NEGATIVE) if with_negative else None
        return cond, None if negative is None else self.concat([_moved(negative, self.device)] * len(prompts))

    def _row(self, prompt: str | None) -> Conditioning | None:
        """A prompt's conditioning row (NEGATIVE: the empty prompt's, None in a family without
        one), from the cache or encoded."""
        row = self.prompt_cache.get(prompt)
        if row is None:
            row = self._encode_alone(prompt)
            if row is not None:
                row = _moved(row, self.device)
                self.prompt_cache.put(prompt, row)
        return row

    def _encode_alone(self, prompt: str | None) -> Conditioning | None:
        if prompt is NEGATIVE:
            return self.encode([""], with_negative=True)[1]
        return self.encode([prompt], with_negative=False)[0]

    @torch.no_grad()
    def offload_text_encoders(self, prompts: list[str], with_negative: bool) -> int:
        """`model.offload_text_encoders`: encode `prompts` (and, `with_negative`, the empty prompt),
        keep their rows for the run, then move the text encoders to the CPU, where a prompt
        outside the set can still be encoded, slowly. The kept rows stay on the device while they
        number at most `prompt_cache_size`, else they wait in host memory and move per batch (the
        rows of 25k SD3.5 prompts take 68 GB). Returns the bytes of weights that left the device."""
        keys = [*dict.fromkeys(prompts), *([NEGATIVE] if with_negative else [])]
        keep_on = self.device if len(keys) <= self.prompt_cache.size else torch.device("cpu")
        for key in keys:
            row = self.prompt_cache.get(key)
            row = self._encode_alone(key) if row is None else row
            if row is not None:
                self.prompt_cache.kept[key] = _moved(row, keep_on)
            self.prompt_cache.recent.pop(key, None)
        freed = 0
        for encoder in self.text_encoders().values():
            freed += sum(t.numel() * t.element_size() for t in [*encoder.parameters(), *encoder.buffers()]
                         if t.device.type != "cpu")
            encoder.to("cpu")
        return freed

    def initial_latents(self, generators: list[torch.Generator], height: int, width: int,
                        num_frames: int = 1) -> torch.Tensor:
        """x_T ~ N(0, I) in the family's latent shape and dtype: each sample's noise from its own
        generator."""
        shape = (len(generators), *self.latent_shape(height, width, num_frames))
        return randn_tensor(shape, generator=generators, device=self.device, dtype=self.latent_dtype)

    def predict(self, latents: torch.Tensor, timesteps, cond: Conditioning, negative: Conditioning | None,
                guidance_scale: float) -> torch.Tensor:
        """The prediction, with classifier-free guidance when `negative` is given:
        out = out_uncond + w (out_cond - out_uncond) (Ho & Salimans 2022)."""
        timesteps = torch.as_tensor(timesteps, device=latents.device).expand(latents.shape[0])
        dtype = self.denoiser.dtype
        if negative is None:
            return self.forward(latents.to(dtype), timesteps, cond, guidance_scale)
        both = self.concat([negative, cond])  # one batch: the unconditional rows, then the conditional
        out = self.forward(torch.cat([latents, latents]).to(dtype), torch.cat([timesteps, timesteps]),
                           both, guidance_scale)
        uncond, text = out.chunk(2)
        return uncond + guidance_scale * (text - uncond)

    def lora_layers(self, peft_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The adapter's peft state in the layout the pipeline's `save_lora_weights` expects."""
        return peft_state

    def save_lora(self, peft_state: dict[str, torch.Tensor], metadata: dict, directory: str | Path) -> None:
        """Write a LoRA that `pipeline_class.load_lora_weights(directory)` loads."""
        self.pipeline_class.save_lora_weights(
            str(directory),
            **{f"{self.denoiser_name}_lora_layers": self.lora_layers(peft_state),
               f"{self.denoiser_name}_lora_adapter_metadata": metadata},
            safe_serialization=True,
        )

    def read_lora(self, directory: str | Path) -> dict[str, torch.Tensor]:
        """A saved LoRA's weights as the denoiser's peft state."""
        from diffusers.utils import convert_unet_state_dict_to_peft

        state = self.pipeline_class.lora_state_dict(str(directory))
        state = state[0] if isinstance(state, tuple) else state
        prefix = f"{self.denoiser_name}."
        return convert_unet_state_dict_to_peft(
            {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})


def step_settings_of(sample: SampleConfig) -> dict[str, Any]:
    """The settings of each kind of step, by their section of `sample` ("ddim", "flow")."""
    return {f.name: getattr(sample, f.name) for f in dataclasses.fields(sample)
            if dataclasses.is_dataclass(getattr(sample, f.name))}


def changed_settings(settings: Any) -> list[str]:
    """The fields of a settings dataclass that differ from their defaults."""
    defaults = type(settings)()
    return [f.name for f in dataclasses.fields(settings) if getattr(settings, f.name) != getattr(defaults, f.name)]


def _families() -> dict[str, type[ModelFamily]]:
    """Every family module of this package, by the pipeline class names it serves."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, ModelFamily) and value.__module__ == module.__name__:
                found.update(dict.fromkeys(value.class_names, value))
    return found


def family_named(class_name: str) -> type[ModelFamily]:
    families = _families()
    if class_name not in families:
        raise ValueError(f"'{class_name}' pipelines are not supported; the model families are "
                         f"{sorted(families)}")
    return families[class_name]


def family_of(pipe) -> ModelFamily:
    """The adapter for a pipeline object."""
    return family_named(type(pipe).__name__)(pipe)
