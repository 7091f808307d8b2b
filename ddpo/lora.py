"""LoRA on the UNet's attention projections (peft): attach, extract, load in place, save."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict

LoraState = dict[str, torch.Tensor]


def attach_lora(unet: torch.nn.Module, rank: int, alpha: float, target_modules: list[str], seed: int) -> None:
    """Add a trainable LoRA adapter to the UNet (base weights stay frozen). The A matrices are
    Gaussian, the B matrices zero, so the adapted UNet starts equal to the base one. LoRA
    weights are float32 even when the base is float16."""
    torch.manual_seed(seed)
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=target_modules)
    )
    for param in unet.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def lora_parameters(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in unet.parameters() if p.requires_grad]


def get_lora_state(unet: torch.nn.Module) -> LoraState:
    """The LoRA weights as a flat dict of detached CPU tensors (what the learner broadcasts)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(unet).items()}


@torch.no_grad()
def load_lora_state(unet: torch.nn.Module, state: LoraState) -> None:
    """Copy LoRA weights into the existing adapter, in place (no rebuild, no file I/O)."""
    result = set_peft_model_state_dict(unet, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise ValueError(
            f"LoRA state does not match the UNet's adapter (unexpected: {result.unexpected_keys[:3]}, "
            f"missing: {missing[:3]}); check lora.rank and lora.target_modules"
        )


def save_lora(unet: torch.nn.Module, directory: str | Path) -> None:
    """Write the LoRA in the diffusers format: `pipe.load_lora_weights(directory)` loads it.
    The adapter's config goes along as metadata, so lora_alpha (the scale) survives the trip."""
    StableDiffusionPipeline.save_lora_weights(
        str(directory),
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        safe_serialization=True,
    )
