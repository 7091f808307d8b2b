"""Adding a model family is one file plus its test and config.

First, a new family dropped into ddpo/families/ as one file (a toy: its own pipeline class, a
token-sequence latent instead of an image-shaped one, a conditioning whose prompts have their own
lengths and an attention mask, the flow SDE as its step) is found by the registry and samples,
rescores its log-probs and has its settings checked through the generic code alone. Second, no
module outside the families names a family, its pipeline class or a component class only its
pipeline has, but for the short list below: nothing else needs an edit for a new family.
"""

import ast
import inspect
import re
import sys
import textwrap
import typing
from collections import Counter
from pathlib import Path

import pytest
import torch
import transformers

from ddpo.config import ConfigError, load_config
from tests.float_error import U32, gaussian_log_prob_error

ROOT = Path(__file__).resolve().parent.parent

TOY_FAMILY = '''
"""A toy family: a transformer on token latents [B, (H/p)(W/p), C] that attends to the prompt's
word tokens, each prompt as long as its words (an attention mask marks them), stepped with the
flow SDE."""

import numpy as np
import torch
from diffusers import ConfigMixin, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ModelMixin
from diffusers.configuration_utils import register_to_config

from ddpo.families import ModelFamily
from ddpo.flow import ode_step, sde_step_with_logprob
from ddpo.media import Media


class ToyTextEncoder(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, vocab: int = 64, width: int = 16):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)

    def forward(self, ids):
        return self.embed(ids)


class ToyTransformer(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, channels: int = 4, width: int = 16, patch: int = 4):
        super().__init__()
        self.proj_in = torch.nn.Linear(channels, width)
        self.time = torch.nn.Linear(1, width)
        self.to_q, self.to_k, self.to_v = (torch.nn.Linear(width, width) for _ in range(3))
        self.proj_out = torch.nn.Linear(width, channels)

    def forward(self, latents, timesteps, text, mask):
        h = self.proj_in(latents) + self.time(timesteps.to(latents.dtype)[:, None, None] / 1000)
        attended = torch.nn.functional.scaled_dot_product_attention(
            self.to_q(h), self.to_k(text), self.to_v(text), attn_mask=mask[:, None, :].bool())
        return self.proj_out(h + attended)


class ToyPipeline(DiffusionPipeline):
    def __init__(self, transformer, text_encoder, scheduler):
        super().__init__()
        self.register_modules(transformer=transformer, text_encoder=text_encoder, scheduler=scheduler)


def build(seed: int = 0) -> ToyPipeline:
    torch.manual_seed(seed)
    return ToyPipeline(ToyTransformer().eval(), ToyTextEncoder().eval(), FlowMatchEulerDiscreteScheduler(shift=1.0))


class Toy(ModelFamily):
    class_names = ("ToyPipeline",)
    pipeline_class = ToyPipeline
    denoiser_name = "transformer"
    step_settings = "flow"
    step_name = "the flow SDE"
    sequence_masks = {"tokens": "tokens_mask"}
    size_rule = "one latent token per patch x patch pixels"

    @classmethod
    def size_multiple(cls, config_of):
        return config_of("transformer")["patch"]

    def set_timesteps(self, num_steps, height, width):
        self.scheduler.set_timesteps(num_steps, device=self.device)
        return self.scheduler.timesteps

    def _encode(self, prompts):
        ids = [[1] + [2 + sum(map(ord, word)) % 62 for word in prompt.split()] for prompt in prompts]
        length = max(map(len, ids))  # the batch's longest prompt, the others padded, as Qwen-Image's encoder
        mask = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in ids])
        tokens = self.pipe.text_encoder(torch.tensor([row + [0] * (length - len(row)) for row in ids]))
        return {"tokens": tokens, "tokens_mask": mask}

    def encode(self, prompts, with_negative):
        return self._encode(prompts), self._encode([""] * len(prompts)) if with_negative else None

    def forward(self, latents, timesteps, cond, guidance_scale):
        return self.denoiser(latents, timesteps, cond["tokens"], cond["tokens_mask"])

    def step(self, model_output, timesteps, latents, sample, prev_sample=None, generator=None):
        return sde_step_with_logprob(self.scheduler, model_output, timesteps, latents,
                                     noise_level=sample.flow.noise_level, prev_sample=prev_sample,
                                     generator=generator, log_prob_reduction=sample.log_prob_reduction,
                                     sde_type=sample.flow.sde_type)

    def ode_step(self, model_output, timesteps, latents):
        return ode_step(self.scheduler, model_output, timesteps, latents)

    def noised(self, x0, noise, timesteps):
        sigma = (timesteps.float() / 1000).reshape(-1, 1, 1)
        return (1 - sigma) * x0 + sigma * noise, noise - x0

    def latent_shape(self, height, width, num_frames=1):
        c = self.denoiser.config
        return (height // c.patch) * (width // c.patch), c.channels

    @torch.no_grad()
    def decode(self, latents):
        c, b = self.denoiser.config, latents.shape[0]
        side = int(round(latents.shape[1] ** 0.5))
        image = latents.float().reshape(b, side, side, c.channels)[..., :3]
        image = image.repeat_interleave(c.patch, dim=1).repeat_interleave(c.patch, dim=2)
        return Media.from_images(((image.tanh() / 2 + 0.5) * 255).round().to(torch.uint8).numpy())
'''


@pytest.fixture()
def toy(tmp_path, monkeypatch):
    """The toy family as a file in a folder of the families package: the registry's only way in."""
    import ddpo.families

    (tmp_path / "toy.py").write_text(TOY_FAMILY)
    monkeypatch.setattr(ddpo.families, "__path__", [*ddpo.families.__path__, str(tmp_path)])
    try:
        yield
    finally:
        sys.modules.pop("ddpo.families.toy", None)
        if hasattr(ddpo.families, "toy"):
            delattr(ddpo.families, "toy")


# the most terms one reduction of a toy forward sums, along its depth: proj_in over 4 channels,
# the time embedding, q/k/v and proj_out over the width 16, the scores over 16, the softmax's sum
# and weighted sum over at most 8 text tokens, and 8 for the elementwise steps (a forward's error
# is at most the sum of its reductions' n u, Higham)
TOY_TERMS = 4 + 1 + 3 * 16 + 16 + 16 + 2 * 8 + 8


def _toy_model():
    from ddpo.families import family_named, family_of

    family = family_named("ToyPipeline")  # the registry imports the new file
    module = sys.modules[family.__module__]
    assert family.__module__ == "ddpo.families.toy" and family is module.Toy
    model = family_of(module.build())
    assert type(model) is family
    return model


def test_a_new_family_file_is_found_and_samples_and_rescores_through_the_generic_code(toy):
    from ddpo.config import SampleConfig
    from ddpo.rollout import sample_trajectories, step_log_prob

    model = _toy_model()
    sample = SampleConfig(num_steps=3, guidance_scale=3.0, height=16, width=16)
    prompts, seeds = ["a cat", "a small red dog riding a bike"], [5, 6]
    trajectories = sample_trajectories(model, prompts, seeds, sample)
    n, steps = len(prompts), sample.num_steps
    # the family's latents: 16 tokens of 4 channels, in its dtype; its images
    assert trajectories.latents.shape == (n, steps + 1, 16, 4) and trajectories.latents.dtype == model.latent_dtype
    assert trajectories.media.images.shape == (n, 16, 16, 3) and trajectories.media.images.dtype == "uint8"
    assert trajectories.log_probs.shape == (n, steps)

    # every stored step rescored in one batch, prompts of different lengths padded by their mask
    cond, negative = model.conditioning(prompts * steps, with_negative=True)
    model.set_timesteps(steps, sample.height, sample.width)
    flat = lambda x: x.transpose(0, 1).reshape(n * steps, *x.shape[2:])  # noqa: E731
    with torch.no_grad():
        step = step_log_prob(model, flat(trajectories.latents[:, :-1]), flat(trajectories.latents[:, 1:]),
                             flat(trajectories.timesteps), cond, negative, sample)
    # Rescored in a batch of another shape, the step's mean may round otherwise: one forward's
    # reductions sum at most TOY_TERMS terms (so its output is within TOY_TERMS u of its scale),
    # guidance's u + w (t - u) scales that by 2w + 1, and the step's Euler update carries it into
    # the mean at most at the mean's own scale. A padded token attended to would move the mean by
    # a share of the text's values, orders of magnitude more.
    w = sample.guidance_scale
    mean_error = TOY_TERMS * (2 * w + 1) * U32 * step.mean.double().abs().amax()
    bound = gaussian_log_prob_error(flat(trajectories.latents[:, 1:]).double(), step.mean.double(),
                                    step.std.double(), mean_error, 4 * U32, sample.log_prob_reduction)
    assert ((step.log_prob.double() - flat(trajectories.log_probs).double()).abs() <= bound).all()
    # and a sample is the same whatever batch it is drawn in (its padding never attended to), up to
    # that rounding in each of the steps, compounded: at most steps times the mean's error
    alone = sample_trajectories(model, prompts[:1], seeds[:1], sample)
    latent_error = steps * TOY_TERMS * (2 * w + 1) * U32 * trajectories.latents.double().abs().amax()
    assert (alone.latents[0].double() - trajectories.latents[0].double()).abs().max() <= latent_error


def test_guidance_joins_conditionings_of_unequal_lengths_by_their_masks(toy):
    """Classifier-free guidance runs the empty prompt (1 token) beside prompts of 3 and 8 in one
    batch: padded by their masks, each predicts what it predicts alone, unpadded."""
    model = _toy_model()
    prompts = ["a cat", "a small red dog riding a bike"]
    cond, negative = model.conditioning(prompts, with_negative=True)
    assert cond["tokens_mask"].sum(dim=1).tolist() == [3, 8] and negative["tokens"].shape[1] == 1
    timesteps = model.set_timesteps(3, 16, 16)
    latents = torch.randn(2, *model.latent_shape(16, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        joined = model.predict(latents, timesteps[1], cond, negative, 3.0)
        alone = torch.cat([model.predict(latents[i:i + 1], timesteps[1], *model.encode([prompt], True), 3.0)
                           for i, prompt in enumerate(prompts)])
    # the same up to one guided forward's rounding (TOY_TERMS u of its scale, times 2w + 1 = 7)
    assert (joined - alone).abs().max() <= TOY_TERMS * 7 * U32 * alone.abs().max()


def test_the_new_familys_settings_are_checked_by_its_own_rules(toy):
    from ddpo.pipeline import check_family_settings

    model = _toy_model()
    check_family_settings(load_config(None, ["sample.height=16", "sample.width=20", "sample.flow.sde_window=2"]), model)
    with pytest.raises(ConfigError, match=r"^sample\.width: must be a multiple of 4 for Toy \(one latent token per "
                                          r"patch x patch pixels\), got 18 \(model\.pretrained '.*' is a Toy model\)$"):
        check_family_settings(load_config(None, ["sample.width=18"]), model)
    with pytest.raises(ConfigError, match=r"^sample\.ddim\.eta: Toy steps with the flow SDE \(sample\.flow\) and reads "
                                          r"no sample\.ddim setting; remove it"):
        check_family_settings(load_config(None, ["sample.ddim.eta=0.5"]), model)


# -- which files a new family may touch ------------------------------------------------------------

PACKAGES = ["ddpo", "cluster", "actors", "learner", "rewards"]
# Outside its own file (ddpo/families/<name>.py), its test (tests/) and its config (configs/), a
# family is named only here; every other module reaches it through ddpo.families (family_named,
# family_of, the ModelFamily interface). Benchmarks and scripts build each family's models too.
ALLOWED = {
    "ddpo/families/": "the families themselves",
    "ddpo/pipeline.py": "its builtin builders: builtin:tiny is a StableDiffusionPipeline built in code",
}


def _families():
    from ddpo.families import ModelFamily, _families

    return set(_families().values()), ModelFamily


def _component_classes(pipeline_class: type) -> set[str]:
    """The diffusers and transformers classes of a pipeline's components, from its __init__."""
    names = set()
    for parameter in inspect.signature(pipeline_class.__init__).parameters.values():
        for kind in typing.get_args(parameter.annotation) or (parameter.annotation,):
            if isinstance(kind, type) and kind.__module__.split(".")[0] in ("diffusers", "transformers"):
                names.add(kind.__name__)
    return names


def family_specific_names() -> set[str]:
    """What names a family: its classes (and the bases only families share), the pipeline
    classes it serves, and the component classes that only its pipeline has (its transformer,
    its VAE, its text encoder, when no other family's pipeline has them)."""
    families, base = _families()
    names, components = set(), Counter()
    for family in families:
        names.update(cls.__name__ for cls in family.__mro__[:family.__mro__.index(base)])
        names.update([*family.class_names, family.pipeline_class.__name__])
        components.update(_component_classes(family.pipeline_class))
    # transformers' Auto classes (a pipeline's AutoTokenizer) load any model: no family's own
    generic = {name for name in components if name.startswith("Auto") and hasattr(transformers, name)}
    return names | {name for name, count in components.items() if count == 1 and name not in generic}


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                found.add(id(first.value))
    return found


def names_in(path: Path, names: set[str]) -> set[str]:
    """The names of `names` that the module's code uses: identifiers, imports, attributes, and
    words of its strings (a class name passed by name), not its comments or docstrings."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings, words = _docstrings(tree), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.add(node.id)
        elif isinstance(node, ast.Attribute):
            words.add(node.attr)
        elif isinstance(node, ast.alias):
            words.update(node.name.split("."))
        elif isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            words.add(node.name)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words.update(re.findall(r"\w+", node.value))
    return words & names


def _allowed(relative: str) -> bool:
    return any(relative == entry or (entry.endswith("/") and relative.startswith(entry)) for entry in ALLOWED)


def test_the_family_names_are_the_families_and_their_own_classes():
    names = family_specific_names()
    assert {"StableDiffusion3Pipeline", "FluxPipeline", "QwenImagePipeline", "StableDiffusionXLPipeline",
            "StableDiffusionPipeline", "StableDiffusionXL", "DDIMFamily", "FlowMatchFamily", "QwenImage",
            "SD3Transformer2DModel", "FluxTransformer2DModel", "QwenImageTransformer2DModel",
            "AutoencoderKLQwenImage", "Wan", "WanPipeline", "WanTransformer3DModel", "AutoencoderKLWan",
            "UMT5EncoderModel"} <= names
    # what every family or several share is no family's own
    assert not names & {"ModelFamily", "AutoencoderKL", "UNet2DConditionModel", "CLIPTextModel",
                        "FlowMatchEulerDiscreteScheduler", "T5EncoderModel"}


def test_no_module_outside_the_families_names_a_family():
    """A new family touches its own file, its test and its config: no other module names a
    family, its pipeline or its own component classes, but for the ALLOWED files (and each of
    those still needs its entry)."""
    names = family_specific_names()
    named = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            found = names_in(path, names)
            if found:
                named[relative] = sorted(found)
    outside = {path: found for path, found in named.items() if not _allowed(path)}
    assert outside == {}, textwrap.shorten(f"modules outside ddpo/families/ name a family: {outside}", 2000)
    stale = [entry for entry in ALLOWED if not entry.endswith("/") and entry not in named]
    assert stale == [], f"ALLOWED entries that no longer name a family (drop them): {stale}"
