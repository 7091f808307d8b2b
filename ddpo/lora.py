"""LoRA on the denoiser's attention projections (peft): attach, extract, load in place, save,
and the reference policy (the same network with the adapter switched off)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict

if TYPE_CHECKING:
    from ddpo.families import ModelFamily

LoraState = dict[str, torch.Tensor]


def attach_lora(denoiser: torch.nn.Module, rank: int, alpha: float, target_modules: list[str], seed: int) -> None:
    """Add a trainable LoRA adapter to the UNet or transformer (base weights stay frozen). The A
    matrices are Gaussian, the B matrices zero, so the adapted model starts equal to the base
    one. LoRA weights are float32 even when the base is float16."""
    torch.manual_seed(seed)
    denoiser.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=target_modules)
    )
    for param in denoiser.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def lora_parameters(denoiser: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in denoiser.parameters() if p.requires_grad]


def get_lora_state(denoiser: torch.nn.Module) -> LoraState:
    """The LoRA weights as a flat dict of detached CPU tensors (what the learner broadcasts)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(denoiser).items()}


@torch.no_grad()
def load_lora_state(denoiser: torch.nn.Module, state: LoraState) -> None:
    """Copy LoRA weights into the existing adapter, in place (no rebuild, no file I/O)."""
    result = set_peft_model_state_dict(denoiser, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise ValueError(
            f"LoRA state does not match the model's adapter (unexpected: {result.unexpected_keys[:3]}, "
            f"missing: {missing[:3]}); check lora.rank and lora.target_modules"
        )


def save_lora(model: ModelFamily, directory: str | Path) -> None:
    """Write the LoRA in the diffusers format of the model's family:
    `<Pipeline>.load_lora_weights(directory)` loads it. The adapter's config goes along as
    metadata, so lora_alpha (the scale) survives the trip."""
    model.save_lora(get_peft_model_state_dict(model.denoiser), model.denoiser.peft_config["default"].to_dict(),
                    directory)


@contextmanager
def reference_policy(denoiser: torch.nn.Module) -> Iterator[None]:
    """The reference policy p_ref for the KL penalty: the same network with the adapter off."""
    denoiser.disable_adapters()
    try:
        yield
    finally:
        denoiser.enable_adapters()
