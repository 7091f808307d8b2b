"""The memory plan: what each device of a run will hold, computed before any model loads.

Nothing is loaded and nothing is downloaded: every component of the pipeline is built on the meta
device from its config (a local folder's `config.json` files, or the copies shipped in
`ddpo/assets/model_configs/` for the hub models of the shipped configs), and the denoiser's and the
VAE's forwards run on meta tensors at the run's real shapes, while a dispatch mode counts the bytes
of the tensors alive at each moment. Per device:

- weights: each module's parameters and buffers, in `model.dtype` (the modules transformers and
  diffusers keep in float32 stay float32, as their `from_pretrained` does);
- trainable: the LoRA parameters (float32, ddpo/lora.py `attach_lora`), on a learner's device
  with their gradients and AdamW's two moments (4 x 4 bytes a parameter), plus DiffusionNFT's
  frozen old-policy copy; on a sampler's own device the parameters alone;
- activations: the peak of live tensors during one sampling forward (no grad), one VAE decode of
  the sample batch, and one training forward + backward of the learner's micro-batch
  (`train.batch_size` split over the learner ranks, x `train.timesteps_per_forward`, x 2 with
  classifier-free guidance): the LoRA of peft really attached on meta and trainable, the base
  frozen, so what autograd keeps is what it keeps on a GPU, then the backward's gradients; without
  and with diffusers' gradient checkpointing; with a KL to the reference, its no-grad forward
  while the graph is held; with a policy lag, the no-grad forward that recomputes stale
  log-probs;
- the prompt cache: the conditioning rows of the run's prompts kept on the device.

A video family's sample is a clip: its latents [C, f, h, w] have the latent frames of
`sample.num_frames` under the family's `frame_multiple` (Wan: 33 frames, 9 latent frames), and
every forward and decode above is traced at that shape (docs/video.md).

GPUs run attention as fused SDPA (flash / memory-efficient), which never holds the L x L score
matrix; on meta the math path would, so the trace swaps `scaled_dot_product_attention` for a
stand-in of the fused kernel's footprint: the output, and for backward q, k, v, the output and the
log-sum-exp rows (what flash attention saves), then the gradients of q, k and v.

A colocated device holds one model, its sampler and learner rank taking turns: weights +
trainable + prompt cache + the largest of the activations. On separate devices a sampler holds
weights + its LoRA + sampling or decode, a learner weights + trainable + training (the VAE is
loaded by both). With `model.offload_text_encoders` the text encoders leave the device once the
run's prompts are encoded: the steady state excludes them, the start-up peak includes them.

Measured against (bench/memory_plan.py, CPU, float32): within 6% for sampling, training (with and
without checkpointing) and decode, except where a kernel's own workspace outgrows small
activations. Not counted: the caching allocator's rounding and fragmentation, kernel workspaces
(cuDNN's, oneDNN's weight reorders), the CUDA context (`CUDA_CONTEXT_BYTES`, added in the fit
only, as torch.cuda.max_memory_allocated does not see it), the text encoders' activations while
they encode (batch 1, short), the optimizer step's temporaries (after the activations are freed).
"""

from __future__ import annotations

import functools
import json
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ddpo.config import Config
from ddpo.errors import ConfigError, one_line

# the hub models of the shipped configs: model_index.json and each component's config.json
MODEL_CONFIGS = Path(__file__).resolve().parent / "assets" / "model_configs"
GIB = 2**30
# what a CUDA context takes outside PyTorch's allocator (cuBLAS and cuDNN workspaces, kernels):
# counted in the fit only, as torch.cuda.max_memory_allocated does not see it
CUDA_CONTEXT_BYTES = GIB // 2
# bytes a trainable LoRA parameter costs a learner: float32 value, gradient, AdamW's two moments
LEARNER_BYTES_PER_LORA_PARAM = 4 * 4


class PlanUnavailable(ConfigError):
    """The model's shapes cannot be known here (a hub id with no shipped configs, offline)."""


class MemoryPlanError(ConfigError):
    """The layout cannot fit in the devices' memory; the message names the knobs to turn."""


# ---------------------------------------------------------------------------------------------
# Counting live bytes on the meta device


class LiveBytes(TorchDispatchMode):
    """The bytes of the tensors made inside it, alive at each moment: every op's outputs are
    counted by storage (views share their base's), and a storage is freed when the last tensor
    on it dies (weakref finalizers; autograd's saved tensors keep theirs alive, as on a GPU).
    `peak(exclude)` replays the events without the storages `exclude` (e.g. the gradients of the
    parameters, counted as trainable). Views of the storages of `weights` (a weight transposed,
    a no-op cast) are the weights' bytes, not new ones."""

    def __init__(self, weights: torch.nn.Module | None = None):
        super().__init__()
        self._weights = ({t.untyped_storage()._cdata for t in [*weights.parameters(), *weights.buffers()]}
                         if weights is not None else set())
        self._refs: dict[int, int] = {}  # live storage address -> its live tensors
        self._bytes: dict[int, int] = {}
        self._ids: dict[int, int] = {}  # live storage address -> its id, unique over the trace
        self._next_id = 0
        self.events: list[tuple[int, int]] = []  # (storage id, +bytes when made, -bytes when freed)

    def track(self, tensor: torch.Tensor) -> None:
        key = tensor.untyped_storage()._cdata  # the storage's address: reused once it is freed
        if key in self._weights:
            return
        if key not in self._refs:
            self._refs[key], self._bytes[key] = 0, tensor.untyped_storage().nbytes()
            self._ids[key] = self._next_id = self._next_id + 1
            self.events.append((self._next_id, self._bytes[key]))
        self._refs[key] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.events.append((self._ids.pop(key), -self._bytes.pop(key)))

    def storage_id(self, tensor: torch.Tensor) -> int | None:
        """The id in `events` of a live tracked tensor's storage."""
        return self._ids.get(tensor.untyped_storage()._cdata)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        key = _op_key(func, args, kwargs)
        specs = _META_OUTPUTS.get(key) if key is not None else None
        if specs is not None:  # the same op on the same shapes before: its outputs' shapes
            out = _rebuild(specs)
        else:
            out = func(*args, **kwargs)
            if key is not None:  # not an op whose output shares an input's storage (_unsafe_view)
                inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
                fresh = all(t.untyped_storage()._cdata not in inputs for t in tree_leaves(out)
                            if isinstance(t, torch.Tensor))
                _META_OUTPUTS[key] = _output_specs(out) if fresh else None
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.track(leaf)
        return out

    def peak(self, exclude: frozenset[int] = frozenset()) -> int:
        live = peak = 0
        for key, delta in self.events:
            if key not in exclude:
                live += delta
                peak = max(peak, live)
        return peak


# The meta kernels are Python (torch._refs) and the blocks of a model repeat the same ops on the
# same shapes: an op that makes new tensors from nothing but its arguments' metadata is run once
# per signature, then its outputs are made from the shapes it gave. Ops whose outputs alias an
# input (views, in-place and out= ops) always run, so that storages stay shared as they are.
_META_OUTPUTS: dict[tuple, object] = {}
_SIMPLE = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)


def _arg_key(value):
    if isinstance(value, torch.Tensor):
        if value.device.type != "meta":
            raise TypeError
        return ("T", tuple(value.shape), value.stride(), value.dtype, value.storage_offset())
    if isinstance(value, _SIMPLE):
        return value
    if isinstance(value, (list, tuple)):
        return tuple(_arg_key(v) for v in value)
    raise TypeError  # a generator, a SymInt: run it


def _op_key(func, args, kwargs) -> tuple | None:
    schema = func._schema
    if any(a.alias_info is not None for a in schema.arguments) or any(r.alias_info is not None for r in schema.returns):
        return None
    try:
        return (func, _arg_key(args), tuple((k, _arg_key(v)) for k, v in sorted(kwargs.items())))
    except TypeError:
        return None


def _output_specs(out):
    if isinstance(out, torch.Tensor):
        if out.device.type != "meta":
            return None
        return ("T", tuple(out.shape), out.stride(), out.dtype, out.untyped_storage().nbytes())
    if isinstance(out, (list, tuple)):
        specs = [_output_specs(o) for o in out]
        return None if any(s is None for s in specs) else (type(out), specs)
    return ("V", out)  # a number, None


def _rebuild(spec):
    if spec[0] == "T":
        _, shape, stride, dtype, nbytes = spec
        tensor = torch.empty_strided(shape, stride, dtype=dtype, device="meta")
        if tensor.untyped_storage().nbytes() != nbytes:
            tensor.untyped_storage().resize_(nbytes)
        return tensor
    if spec[0] == "V":
        return spec[1]
    kind, specs = spec
    return kind(_rebuild(s) for s in specs)


class _FusedAttention(torch.autograd.Function):
    """What fused SDPA holds: its output; saved for backward q, k, v, the output and the
    float32 log-sum-exp of each query row (flash and memory-efficient attention both); and in
    backward the gradients of q, k and v. Never the L x L scores."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = query.new_empty(*query.shape[:-1], value.shape[-1])
        logsumexp = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, logsumexp)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, _, _ = ctx.saved_tensors
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return _FusedAttention.apply(query, key, value)


@contextmanager
def _quiet():
    """Without diffusers' warnings while components are built and cast on meta (that `.to(dtype)`
    is not `from_pretrained(torch_dtype=...)`: `_cast` keeps the float32 modules as it does)."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)


@contextmanager
def _fused_attention_on_meta():
    """Within it, torch.nn.functional.scaled_dot_product_attention is the fused kernels' stand-in
    (diffusers looks it up on the module at each call)."""
    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _fused_sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


# ---------------------------------------------------------------------------------------------
# The model on the meta device


@dataclass
class MetaModel:
    """A pipeline's modules on the meta device, as loaded for a run (dtype, LoRA on the denoiser)."""

    class_name: str  # the pipeline's `_class_name`
    family: type  # its ddpo.families.ModelFamily, which says how the denoiser and the VAE are called
    source: str  # where its configs came from
    modules: dict[str, torch.nn.Module]  # loaded components, by their pipeline name
    denoiser_name: str
    text_encoder_names: list[str]
    vae_name: str
    weight_bytes: dict[str, int]  # each module's parameters and buffers, before the LoRA
    lora_params: int  # trainable LoRA parameters (float32)
    lora_targets: list[str]

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.modules[self.denoiser_name]

    @property
    def vae(self) -> torch.nn.Module:
        return self.modules[self.vae_name]


def _family(pretrained: str, class_name: str):
    """The family adapter of a pipeline class; PlanUnavailable where no family serves it."""
    from ddpo.families import family_named

    try:
        return family_named(class_name)
    except ValueError as err:
        raise PlanUnavailable(f"model.pretrained: '{pretrained}': {err}") from None


def shipped_configs(pretrained: str) -> Path | None:
    """The folder of shipped configs for a hub id (`org/name` -> `org--name`), if there is one."""
    folder = MODEL_CONFIGS / pretrained.replace("/", "--")
    return folder if (folder / "model_index.json").is_file() else None


def config_folder(pretrained: str, revision: str | None = None) -> Path | None:
    """Where the model's configs are read: a builtin model's or a local folder, the shipped copy
    of a hub model's, or the hub's own (its small config files, from the cache or the hub; no
    weights). None for a builtin built in code. PlanUnavailable when none is found."""
    from ddpo.pipeline import BUILTIN_BUILDERS, BUILTIN_FOLDERS

    if pretrained in BUILTIN_BUILDERS:
        return None
    if pretrained in BUILTIN_FOLDERS:
        return BUILTIN_FOLDERS[pretrained]
    local = Path(pretrained).expanduser()
    if (local / "model_index.json").is_file():
        return local
    if local.exists() or pretrained.startswith((".", "/", "~")) or pretrained.count("/") != 1:
        raise PlanUnavailable(f"model.pretrained: '{pretrained}' is not a diffusers pipeline folder "
                              "(no model_index.json there)")
    shipped = shipped_configs(pretrained)
    if shipped is not None:
        return shipped
    return _hub_configs(pretrained, revision)


def _hub_configs(repo: str, revision: str | None) -> Path:
    """A hub model's model_index.json and component configs (kilobytes), in the local cache."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        index_path = Path(hf_hub_download(repo, "model_index.json", revision=revision))
        for name, entry in json.loads(index_path.read_text()).items():
            if isinstance(entry, list) and entry[0] in ("diffusers", "transformers"):
                try:
                    hf_hub_download(repo, f"{name}/config.json", revision=revision)
                except EntryNotFoundError:  # a tokenizer's folder has none
                    continue
    except Exception as err:  # offline, unknown or gated repo: many types, one line
        raise PlanUnavailable(
            f"model.pretrained: no shipped configs for '{repo}' and the hub's cannot be read ({one_line(err)}); "
            "plan a local diffusers folder of it instead (model.pretrained: /path/to/folder)") from None
    return index_path.parent


def _keep_in_float32(module: torch.nn.Module, dtype: torch.dtype) -> list[str]:
    """The submodule names that from_pretrained keeps in float32 at `dtype`: transformers'
    `_keep_in_fp32_modules` at float16, `_keep_in_fp32_modules_strict` at float16 and bfloat16;
    diffusers' `_keep_in_fp32_modules` at any lower precision."""
    from diffusers import ModelMixin

    if dtype == torch.float32:
        return []
    if isinstance(module, ModelMixin):
        return list(module._keep_in_fp32_modules or [])
    keep = list(getattr(module, "_keep_in_fp32_modules_strict", None) or [])
    if dtype == torch.float16:
        keep += list(getattr(module, "_keep_in_fp32_modules", None) or [])
    return keep


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    keep = _keep_in_float32(module, dtype)
    module.to(dtype)
    for name, sub in module.named_modules():
        if keep and any(k in name.split(".") or name.endswith(k) for k in keep):
            sub.float()
    # diffusers' loader matches parameter names too: a kept name may be a parameter of its own
    # (Wan's `scale_shift_table` in every block)
    for name, param in module.named_parameters():
        if keep and any(k in name.split(".") for k in keep):
            param.data = param.data.float()
    return module


def _build_component(folder: Path, library: str, class_name: str) -> torch.nn.Module | None:
    """One component on the meta device from its config.json; None if it is no torch module."""
    if library == "diffusers":
        import diffusers

        cls = getattr(diffusers, class_name, None)
        if cls is None or not issubclass(cls, diffusers.ModelMixin):
            return None
        config = cls.load_config(str(folder))
        with torch.device("meta"):
            return cls.from_config(config)
    if library == "transformers":
        import transformers

        cls = getattr(transformers, class_name, None)
        if cls is None or not issubclass(cls, transformers.PreTrainedModel):
            return None
        config = transformers.AutoConfig.from_pretrained(str(folder))
        with torch.device("meta"):
            return cls(config)
    return None


def _meta_pipeline(pretrained: str, revision: str | None) -> tuple[str, str, dict[str, torch.nn.Module]]:
    """(pipeline class name, config source, its torch modules on meta in float32)."""
    from ddpo.pipeline import meta_pipeline

    folder = config_folder(pretrained, revision)
    if folder is None:  # a builtin built in code: the same code, on meta
        pipe = meta_pipeline(pretrained)
        modules = {name: m for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
        return type(pipe).__name__, "built in code (ddpo/pipeline.py BUILTIN_BUILDERS)", modules
    index = json.loads((folder / "model_index.json").read_text())
    class_name = index.get("_class_name", "?")
    source = (f"the shipped copy of its configs, ddpo/assets/model_configs/{folder.name}"
              if folder.parent == MODEL_CONFIGS else str(folder))
    family = _family(pretrained, class_name)
    skipped = {name for name, value in family.load_kwargs.items() if value is None}
    modules = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or entry[0] is None or name in skipped:
            continue
        if not (folder / name / "config.json").is_file():
            continue  # a tokenizer, a scheduler
        module = _build_component(folder / name, entry[0], entry[1])
        if module is not None:
            modules[name] = module
    return class_name, source, modules


def _module_bytes(module: torch.nn.Module) -> int:
    return (sum(p.numel() * p.element_size() for p in module.parameters())
            + sum(b.numel() * b.element_size() for b in module.buffers()))


@functools.lru_cache(maxsize=8)
def meta_model(pretrained: str, revision: str | None, dtype: str, lora_rank: int, lora_alpha: float,
               lora_targets: tuple[str, ...]) -> MetaModel:
    """The run's model on the meta device: its components in `dtype` (as `load_pipeline` loads
    them), the LoRA of `attach_lora` on the denoiser (empty `lora_targets`: the family's)."""
    from ddpo.lora import attach_lora

    with _quiet():
        class_name, source, modules = _meta_pipeline(pretrained, revision)
        family = _family(pretrained, class_name)
        torch_dtype = getattr(torch, dtype)
        for module in modules.values():
            _cast(module, torch_dtype)
            module.requires_grad_(False)
            module.eval()
    family.upcast(modules)  # what the family runs in float32 whatever the dtype (SDXL's VAE)
    vae_name = next((n for n in modules if n == "vae"), next((n for n in modules if "vae" in n), None))
    denoiser_name = family.denoiser_name
    if denoiser_name not in modules or vae_name is None:
        raise PlanUnavailable(f"model.pretrained: '{pretrained}' ({class_name}) has no {denoiser_name} or no VAE "
                              "to plan for")
    text_encoders = [n for n in modules if n.startswith("text_encoder")]
    weight_bytes = {name: _module_bytes(m) for name, m in modules.items()}
    targets = list(lora_targets) or family.default_lora_targets
    try:
        with torch.device("meta"):  # peft would make the LoRA layers on the CPU, then move them
            attach_lora(modules[denoiser_name], lora_rank, lora_alpha, targets, seed=0)
    except ValueError as err:  # peft: no module matches the targets
        raise ConfigError(f"lora.target_modules: {targets} on the {denoiser_name} of '{pretrained}': "
                          f"{str(err).splitlines()[0][:200]}") from None
    lora_params = sum(p.numel() for p in modules[denoiser_name].parameters() if p.requires_grad)
    return MetaModel(class_name, family, source, modules, denoiser_name, text_encoders, vae_name, weight_bytes,
                     lora_params, targets)


# ---------------------------------------------------------------------------------------------
# The forwards, traced at the run's shapes


@dataclass(frozen=True)
class Shapes:
    """What sets the activations' size: latents [batch, C, h, w] (a video family's [batch, C, f,
    h, w]) and the text tokens."""

    latent_channels: int
    latent_height: int
    latent_width: int
    text_tokens: int  # the conditioning's sequence length as the denoiser sees it
    latent_frames: int = 1  # a video family's latent frames (an image: 1)


def vae_scale_factor(model: MetaModel) -> int:
    """Image pixels per latent pixel, as the model's pipeline computes it (its family's rule)."""
    return model.family.vae_scale_factor(model.vae.config)


def latent_channels(model: MetaModel) -> int:
    return model.family.latent_channels(model.vae.config)


def latent_frames(model: MetaModel, num_frames: int) -> int:
    """A clip's latent frames, as the family's VAE compresses time (`frame_multiple`, read from
    the components' configs): one for the first frame and one per `frame_multiple` frames after
    it (Wan: 33 frames -> 9); 1 for an image family."""
    multiple = model.family.frame_multiple(lambda name: model.modules[name].config)
    return (num_frames - 1) // multiple + 1 if multiple else 1


def text_tokens(model: MetaModel, pretrained: str, max_sequence_length: int | None) -> int:
    """The conditioning's tokens as the family's denoiser sees them, from the CLIP encoder's
    (77) and the other's (T5, Qwen2.5-VL): the config's, a builtin's, or the family's default."""
    from ddpo.pipeline import BUILTIN_MAX_SEQUENCE_LENGTH

    clip = 77
    for name in model.text_encoder_names:
        config = model.modules[name].config
        if getattr(config, "model_type", "") == "clip_text_model":
            clip = config.max_position_embeddings
    length = (max_sequence_length or BUILTIN_MAX_SEQUENCE_LENGTH.get(pretrained)
              or getattr(model.family, "max_sequence_length", None))
    return model.family.text_tokens(clip, length)


def _denoiser_inputs(family, denoiser: torch.nn.Module, batch: int, shapes: Shapes) -> dict:
    """The denoiser's keyword arguments on meta, as its family calls it (ddpo/families/*.py)."""
    try:
        return family.meta_inputs(denoiser, batch, shapes)
    except NotImplementedError:
        raise PlanUnavailable(f"model.pretrained: no memory plan for {family.__name__} (its family module has no "
                              "meta_inputs)") from None


def _trace(module: torch.nn.Module, run, inputs: dict, grad: bool) -> tuple[int, LiveBytes]:
    """The peak live bytes of `run(inputs)` (with `grad`: forward and backward) on meta, the
    inputs included, `module`'s weights not; and the tracker."""
    live = LiveBytes(module)
    for leaf in tree_leaves(inputs):
        if isinstance(leaf, torch.Tensor):
            live.track(leaf)
    with _fused_attention_on_meta(), torch.set_grad_enabled(grad), live:
        out = run(inputs)
        if grad:
            out.float().sum().backward()
        del out
    return live.peak(), live


def sampling_bytes(family, denoiser: torch.nn.Module, batch: int, shapes: Shapes) -> int:
    """The peak of one denoiser forward without grad (a sampling step) on `batch` latents."""
    inputs = _denoiser_inputs(family, denoiser, batch, shapes)
    peak, _ = _trace(denoiser, lambda kw: denoiser(**kw).sample, inputs, False)
    return peak


def training_bytes(family, denoiser: torch.nn.Module, batch: int, shapes: Shapes, gradient_checkpointing: bool,
                   reference_forward: bool = False) -> int:
    """The peak of one training forward + backward on `batch` latents: the LoRA trainable, the
    base frozen (ddpo/lora.py), the inputs not requiring grad; the LoRA's gradients left out
    (they are the trainable bytes). `reference_forward` (train.kl_coef > 0): the reference
    policy's no-grad forward runs between the two, while the graph holds its activations
    (learner/learner.py `_log_prob`)."""

    def run(kwargs):
        out = denoiser(**kwargs).sample
        if reference_forward:
            with torch.no_grad():
                denoiser(**kwargs)
        return out

    if gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    try:
        denoiser.train()
        _, live = _trace(denoiser, run, _denoiser_inputs(family, denoiser, batch, shapes), True)
    finally:
        denoiser.eval()
        if gradient_checkpointing:
            denoiser.disable_gradient_checkpointing()
    grads = set()
    for param in denoiser.parameters():
        if param.grad is not None:
            grads.add(live.storage_id(param.grad))
            param.grad = None
    return live.peak(frozenset(grads))


def decode_bytes(family, vae: torch.nn.Module, batch: int, shapes: Shapes) -> int:
    """The peak of one VAE decode of `batch` latents (no grad), as the family decodes."""
    latents = family.meta_vae_input(batch, shapes, vae.dtype)
    peak, _ = _trace(vae, lambda kw: vae.decode(kw["z"]).sample, {"z": latents}, False)
    return peak


@functools.lru_cache(maxsize=256)
def _cached_trace(key: tuple, what: str, batch: int, shapes: Shapes, checkpointing: bool = False,
                  reference_forward: bool = False) -> int:
    model = meta_model(*key)
    if what == "decode":
        return decode_bytes(model.family, model.vae, batch, shapes)
    if what == "sampling":
        return sampling_bytes(model.family, model.denoiser, batch, shapes)
    return training_bytes(model.family, model.denoiser, batch, shapes, checkpointing, reference_forward)


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass
class DevicePlan:
    """One device of the layout and what it will hold (bytes)."""

    name: str  # e.g. "device 0"
    roles: list[str]  # what it runs, e.g. ["sampler-0", "learner-0"]: one actor, worker-0, when colocated
    weights: dict[str, int]  # by module, as loaded (text encoders dropped when offloaded)
    trainable_bytes: int
    sampling_bytes: int  # activations of one sampling forward (0 without a sampler)
    decode_bytes: int
    training_bytes: int  # of one training forward + backward, with the run's gradient_checkpointing
    training_bytes_checkpointed: int  # the same with train.gradient_checkpointing on
    training_bytes_full: int  # ... and off
    proximal_bytes: int  # max_policy_lag >= 1: the no-grad forward that recomputes stale log-probs
    startup_bytes: int  # with the text encoders still there (model.offload_text_encoders)
    prompt_cache_bytes: int = 0  # the prompts' conditioning rows kept on the device (model.prompt_cache_size)
    sampling_batch: int = 0  # latents through the denoiser in one sampling forward (CFG doubles)
    training_batch: int = 0  # in one training forward: samples x timesteps_per_forward (x 2 CFG)
    decode_batch: int = 0  # latents through the VAE in one decode: sample.batch_size
    fits: bool | None = None

    @property
    def weights_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def activation_bytes(self) -> int:
        return max(self.sampling_bytes, self.decode_bytes, self.training_bytes, self.proximal_bytes)

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.trainable_bytes + self.prompt_cache_bytes + self.activation_bytes

    @property
    def peak_bytes(self) -> int:
        """The most the device holds at any time: the steady state or the start-up."""
        return max(self.total_bytes, self.startup_bytes)

    def to_json(self) -> dict:
        return {**asdict(self), "weights_bytes": self.weights_bytes, "activation_bytes": self.activation_bytes,
                "total_bytes": self.total_bytes, "peak_bytes": self.peak_bytes}


@dataclass
class MemoryPlan:
    pretrained: str
    source: str  # where the model's configs were read
    dtype: str
    layout: str  # colocated or separate
    device_memory_bytes: int | None
    lora_params: int
    lora_targets: list[str]
    gradient_checkpointing: bool
    offload_text_encoders: bool
    devices: list[DevicePlan] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # one sample's latents as the denoiser takes them: [C, h, w], a clip's [C, f, h, w]
    latent_shape: list[int] = field(default_factory=list)
    num_frames: int = 1  # sample.num_frames

    @property
    def fits(self) -> bool | None:
        """False if any device cannot hold its peak; None when the device memory is unknown."""
        verdicts = [d.fits for d in self.devices]
        return None if None in verdicts else all(verdicts)

    def to_json(self) -> dict:
        data = asdict(self)
        data["devices"] = [d.to_json() for d in self.devices]
        data["fits"] = self.fits
        return data

    def worst(self) -> DevicePlan:
        """The device with the largest peak."""
        return max(self.devices, key=lambda d: d.peak_bytes)

    def refusal(self) -> str | None:
        """One line, when a device cannot fit: its figures and the knobs to turn; else None."""
        if self.fits is not False:
            return None
        d = next(d for d in self.devices if d.fits is False)
        def gib(n: int) -> str:
            return f"{n / GIB:.1f}" if n >= GIB else f"{n / GIB:.2f}"

        figures = (f"weights {gib(d.weights_bytes)} + trainable {gib(d.trainable_bytes)} + prompt cache "
                   f"{gib(d.prompt_cache_bytes)} + activations {gib(d.activation_bytes)}")
        if d.startup_bytes > d.total_bytes:
            figures = f"at start-up, with the text encoders; steady state {gib(d.total_bytes)}"
        knobs = []
        phase = max([("sampling", d.sampling_bytes), ("decode", d.decode_bytes), ("training", d.training_bytes),
                     ("proximal", d.proximal_bytes)], key=lambda item: item[1])[0]
        if phase == "training":
            if not self.gradient_checkpointing:
                knobs.append(f"set train.gradient_checkpointing: true (training activations {gib(d.training_bytes)} -> "
                             f"{gib(d.training_bytes_checkpointed)} GiB)")
            knobs.append(f"lower train.batch_size or train.timesteps_per_forward (a forward of {d.training_batch} "
                         "latents), or raise cluster.num_learners")
        elif phase == "proximal":
            knobs.append("lower train.batch_size (the stale log-probs of that many samples in one no-grad forward)")
        else:
            batch = d.decode_batch if phase == "decode" else d.sampling_batch
            knobs.append(f"lower sample.batch_size ({phase} of {batch} latents)")
        encoders = sum(b for n, b in d.weights.items() if n.startswith("text_encoder"))
        if encoders > 0.01 * d.total_bytes and not self.offload_text_encoders:
            knobs.append(f"set model.offload_text_encoders: true (-{gib(encoders)} GiB after start-up)")
        if self.layout == "colocated":
            knobs.append("or use cluster.layout: separate (samplers and learners on devices of their own)")
        return (f"memory plan: {d.name} ({_kind(d)}: {' + '.join(d.roles)}) needs {gib(d.peak_bytes)} GiB ({figures}) + "
                f"{gib(CUDA_CONTEXT_BYTES)} GiB of CUDA context but has {gib(self.device_memory_bytes)} GiB "
                "(cluster.device_memory_gb or --gpu-memory): " + "; ".join(knobs) + " (see `ddpo plan`)")


def _uses_cfg(family, guidance_scale: float) -> bool:
    """Whether guidance doubles the denoiser's batch: the family's answer (FLUX: never)."""
    return family.uses_cfg(object.__new__(family), guidance_scale)


def _counts(config: Config, num_devices: int | None, notes: list[str]) -> tuple[str, int, int]:
    """(layout, samplers, learners), the `auto`s resolved as cluster/placement.py does for
    `num_devices` devices (None: 1, the largest share each, said in a note)."""
    c = config.cluster
    layout = c.layout if c.layout != "auto" else ("colocated" if c.max_policy_lag == 0 else "separate")
    devices = num_devices or 1
    if "auto" in (c.num_samplers, c.num_learners) and num_devices is None:
        notes.append("cluster.num_samplers/num_learners auto: planned for 1 device (the largest share each); "
                     "set them to plan for more")
    samplers = min(devices, config.sample.num_batches_per_epoch) if c.num_samplers == "auto" else c.num_samplers
    learners = min(devices, config.train.batch_size) if c.num_learners == "auto" else c.num_learners
    return layout, samplers, learners


def _prompt_cache_bytes(config: Config, family, denoiser: torch.nn.Module, shapes: Shapes, cfg: bool) -> int:
    """The conditioning rows the prompt cache keeps on the device (ddpo/families PromptCache): one
    per prompt of the run and the empty prompt's, at most `model.prompt_cache_size`; a row is the
    denoiser's text inputs for one latent."""
    try:
        prompts = len(set(config.load_prompts()))
    except ConfigError:  # a prompt file not here: the cache full
        prompts = config.model.prompt_cache_size
    rows = min(config.model.prompt_cache_size, prompts + (1 if cfg else 0))
    text = family.meta_conditioning(_denoiser_inputs(family, denoiser, 1, shapes))
    return rows * sum(t.numel() * t.element_size() for t in text)


def plan_memory(config: Config, device_memory_bytes: int | None = None, num_devices: int | None = None) -> MemoryPlan:
    """The memory each device of the config's layout will need, from real shapes on the meta
    device. `device_memory_bytes`: what a device has (None: `cluster.device_memory_gb`, else
    unknown and `fits` is None); `num_devices`: for the `auto` counts of `cluster` (None: 1).
    Raises PlanUnavailable when the model's configs cannot be found."""
    if device_memory_bytes is None and config.cluster.device_memory_gb is not None:
        device_memory_bytes = int(config.cluster.device_memory_gb * GIB)
    return plan_for(config, config.model.pretrained, device_memory_bytes=device_memory_bytes,
                    num_devices=num_devices, revision=config.model.revision)


def plan_for(config: Config, pretrained: str, device_memory_bytes: int | None = None, num_devices: int | None = None,
             revision: str | None = None) -> MemoryPlan:
    """`plan_memory` for the model at `pretrained` (a local pipeline folder, say one a benchmark
    built and saved) with the rest of `config`."""
    notes: list[str] = []
    m, s, t = config.model, config.sample, config.train
    key = (pretrained, revision, m.dtype, config.lora.rank, config.lora.alpha, tuple(config.lora.target_modules))
    model = meta_model(*key)
    scale = vae_scale_factor(model)
    shapes = Shapes(latent_channels(model), s.height // scale, s.width // scale,
                    text_tokens(model, pretrained, m.max_sequence_length), latent_frames(model, s.num_frames))
    if model.family.sequence_masks and m.max_sequence_length is None:  # as long as the prompt, to a maximum
        notes.append(f"{model.family.__name__} conditions on the prompt's own tokens: planned for "
                     f"{shapes.text_tokens} (model.max_sequence_length sets it)")
    cfg = _uses_cfg(model.family, s.guidance_scale)
    layout, num_samplers, num_learners = _counts(config, num_devices, notes)
    nft = t.algorithm == "diffusion_nft"
    lora_bytes = model.lora_params * 4
    prompt_cache = _prompt_cache_bytes(config, model.family, model.denoiser, shapes, cfg)

    def sampler_figures():
        batch = s.batch_size * (2 if cfg else 1)
        return batch, _cached_trace(key, "sampling", batch, shapes), _cached_trace(key, "decode", s.batch_size, shapes)

    def learner_figures(rank: int):
        per_forward = t.timesteps_per_forward * (2 if cfg and t.cfg else 1)
        samples = len(torch.tensor_split(torch.arange(t.batch_size), num_learners)[rank])
        kl = t.kl_coef > 0  # the reference policy's forward too
        full = _cached_trace(key, "training", samples * per_forward, shapes, False, kl)
        checkpointed = _cached_trace(key, "training", samples * per_forward, shapes, True, kl)
        # with a lag, the stale samples' log-probs under the current weights (learner/learner.py
        # `_train_policy_gradient`): no grad, train.batch_size of the rank's samples a forward
        stale = min(t.batch_size, -(-config.samples_per_epoch // num_learners))
        proximal = (_cached_trace(key, "sampling", stale * per_forward, shapes)
                    if config.cluster.max_policy_lag >= 1 and t.algorithm in ("ddpo_is", "ddpo_sf") else 0)
        return samples * per_forward, full, checkpointed, proximal

    if layout == "colocated":
        members = [[*([f"sampler-{i}"] if i < num_samplers else []), *([f"learner-{i}"] if i < num_learners else [])]
                   for i in range(max(num_samplers, num_learners))]
    else:
        members = [[f"learner-{i}"] for i in range(num_learners)] + [[f"sampler-{i}"] for i in range(num_samplers)]

    clip = [shapes.latent_frames] if model.family.medium == "video" else []
    plan = MemoryPlan(pretrained, model.source, m.dtype, layout, device_memory_bytes, model.lora_params,
                      model.lora_targets, t.gradient_checkpointing, m.offload_text_encoders, notes=notes,
                      latent_shape=[shapes.latent_channels, *clip, shapes.latent_height, shapes.latent_width],
                      num_frames=s.num_frames)
    for index, roles in enumerate(members):
        learner = next((int(r.split("-")[1]) for r in roles if r.startswith("learner")), None)
        sampler = any(r.startswith("sampler") for r in roles)
        sampling_batch, sampling, decode = sampler_figures() if sampler else (0, 0, 0)
        training_batch, full, checkpointed, proximal = learner_figures(learner) if learner is not None else (0, 0, 0, 0)
        # a learner: value, gradient, AdamW's moments (+ DiffusionNFT's old copy); a sampler: the value
        trainable = (model.lora_params * (LEARNER_BYTES_PER_LORA_PARAM + (4 if nft else 0))
                     if learner is not None else lora_bytes)
        weights = dict(model.weight_bytes)
        startup = sum(weights.values()) + lora_bytes + prompt_cache
        if m.offload_text_encoders:
            weights = {n: b for n, b in weights.items() if n not in model.text_encoder_names}
        device = DevicePlan(f"device {index}", roles, weights, trainable, sampling, decode,
                            checkpointed if t.gradient_checkpointing else full, checkpointed, full, proximal,
                            startup, prompt_cache, sampling_batch, training_batch, s.batch_size if sampler else 0)
        if device_memory_bytes is not None:
            device.fits = device.peak_bytes + CUDA_CONTEXT_BYTES <= device_memory_bytes
        plan.devices.append(device)
    return plan


# ---------------------------------------------------------------------------------------------
# Reading it


def _gib(n: int) -> str:
    """A size for people: GiB, or MiB below one GiB."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def _kind(d: DevicePlan) -> str:
    """What a device runs: a worker (a sampler and a learner rank in one process), or one role."""
    kinds = sorted({r.split("-")[0] for r in d.roles})
    return "worker" if kinds == ["learner", "sampler"] else kinds[0]


def describe(plan: MemoryPlan) -> str:
    """The plan as a small table (devices with the same figures on one row) and a few lines."""
    memory = _gib(plan.device_memory_bytes) if plan.device_memory_bytes is not None else "unknown"
    lines = [f"memory plan: {plan.pretrained} in {plan.dtype}, layout {plan.layout}, device memory {memory}",
             f"  configs: {plan.source}",
             f"  LoRA: {plan.lora_params / 1e6:.2f}M parameters (float32) on {plan.lora_targets}"]
    if len(plan.latent_shape) == 4:  # a video family: its activations are counted per clip
        lines.append(f"  clips: {plan.num_frames} frames, latents {plan.latent_shape} [C, f, h, w] a clip "
                     "(each 'latent' below is a clip)")
    groups: dict[tuple, list[DevicePlan]] = {}
    for d in plan.devices:
        signature = (tuple(r.split("-")[0] for r in d.roles), d.total_bytes, d.startup_bytes, d.fits)
        groups.setdefault(signature, []).append(d)
    startup = plan.offload_text_encoders  # else the start-up holds less than the steady state
    header = ("devices", "weights", "trainable", "prompts", "activations", "total", *(("start-up",) * startup), "fits")
    rows = []
    for group in groups.values():
        d = group[0]
        label = f"{_kind(d)} x{len(group)}" if len(group) > 1 else f"{_kind(d)} ({d.name})"
        fits = {True: "yes", False: "NO", None: "unknown"}[d.fits]
        rows.append((label, _gib(d.weights_bytes), _gib(d.trainable_bytes), _gib(d.prompt_cache_bytes),
                     _gib(d.activation_bytes), _gib(d.total_bytes), *((_gib(d.startup_bytes),) * startup), fits))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        lines.append("  " + "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                                      for i, (cell, w) in enumerate(zip(row, widths))))
    for group in groups.values():
        d = group[0]
        names = _kind(d)
        lines.append(f"  {names}: weights " + ", ".join(f"{n} {_gib(b)}" for n, b in d.weights.items()))
        parts = []
        if d.sampling_batch:
            parts.append(f"sampling {_gib(d.sampling_bytes)} (a forward of {d.sampling_batch} latents), "
                         f"decode {_gib(d.decode_bytes)}")
        if d.training_batch:
            parts.append(f"training {_gib(d.training_bytes_full)} without / {_gib(d.training_bytes_checkpointed)} with "
                         f"train.gradient_checkpointing (a forward of {d.training_batch} latents; "
                         f"{'on' if plan.gradient_checkpointing else 'off'})")
        if d.proximal_bytes:
            parts.append(f"stale log-probs {_gib(d.proximal_bytes)} (cluster.max_policy_lag >= 1)")
        lines.append(f"  {names}: activations " + "; ".join(parts))
    if plan.offload_text_encoders:
        lines.append("  model.offload_text_encoders: the text encoders leave once the prompts are encoded "
                     "(the start-up holds them)")
    lines.extend(f"  note: {note}" for note in plan.notes)
    if plan.device_memory_bytes is not None:
        lines.append(f"  fits: the total{' (and the start-up)' * startup} + {_gib(CUDA_CONTEXT_BYTES)} of CUDA "
                     "context within the device memory")
    return "\n".join(lines)


def local_device_memory() -> int | None:
    """The local GPU's memory in bytes, if one is visible."""
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return torch.cuda.get_device_properties(0).total_memory
    return None
