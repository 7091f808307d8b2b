"""LoRA on the denoiser's attention projections (peft): attach, extract, load in place, save,
and the reference policy (the same network with the adapter switched off)."""

from __future__ import annotations

import warnings
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


def get_lora_state(denoiser: torch.nn.Module, adapter: str = "default") -> LoraState:
    """The LoRA weights as a flat dict of detached CPU tensors (what the learner broadcasts)."""
    return {k: v.detach().to("cpu", copy=True)
            for k, v in get_peft_model_state_dict(denoiser, adapter_name=adapter).items()}


@torch.no_grad()
def load_lora_state(denoiser: torch.nn.Module, state: LoraState, adapter: str = "default") -> None:
    """Copy LoRA weights into the existing adapter, in place (no rebuild, no file I/O)."""
    result = set_peft_model_state_dict(denoiser, state, adapter_name=adapter)
    # this adapter's weights only: another adapter on the model (DiffusionNFT's old policy) is not loaded here
    missing = [k for k in result.missing_keys if "lora_" in k and f".{adapter}." in k]
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


def add_adapter_copy(denoiser: torch.nn.Module, name: str) -> list[torch.nn.Parameter]:
    """A second adapter `name` on the same base weights, equal to the trained one ("default")
    and frozen: DiffusionNFT's old policy, with no second copy of the model. The trained adapter
    stays the active one. Returns the copy's parameters, in the trained adapter's order."""
    config = denoiser.peft_config["default"]
    with warnings.catch_warnings():  # peft warns that the model now has two adapters: it is meant to
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        denoiser.add_adapter(LoraConfig(r=config.r, lora_alpha=config.lora_alpha,
                                        target_modules=config.target_modules), adapter_name=name)
    denoiser.set_adapter("default")
    copies = dict(denoiser.named_parameters())
    params = [copies[key.replace(".default.", f".{name}.")] for key, p in denoiser.named_parameters()
              if p.requires_grad]
    with torch.no_grad():
        for param, trained in zip(params, lora_parameters(denoiser)):
            param.data = trained.detach().clone()
    return params


@contextmanager
def active_adapter(denoiser: torch.nn.Module, name: str) -> Iterator[None]:
    """Run the denoiser with adapter `name` instead of the trained one (then back to it)."""
    denoiser.set_adapter(name)
    try:
        yield
    finally:
        denoiser.set_adapter("default")


@contextmanager
def reference_policy(denoiser: torch.nn.Module) -> Iterator[None]:
    """The reference policy p_ref for the KL penalty: the same network with the adapter off."""
    denoiser.disable_adapters()
    try:
        yield
    finally:
        denoiser.enable_adapters()
