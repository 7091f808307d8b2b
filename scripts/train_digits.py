"""Train the embedded digits model (`builtin:digits`), its judge (`digit_judge`), its
flow-matching twin (`builtin:digits-flow`), a second judge (`digit_judge_2`) and a
text-to-video twin (`builtin:digits-video`) from scikit-learn's bundled 8x8 handwritten digits.
Seeded and deterministic on CPU. On 2 cores steps 1-5 take 220 s; step 6 took 175 s of training
and 4 s of judging while other jobs loaded the cores (3 min of CPU time).

    python scripts/train_digits.py [--settings ddpo/assets/train_digits.yaml] [--out ddpo/assets]
                                   [--only digits|flow|judge2|video] [--flow-grid samples.png]
                                   [--video-grid clips.png]

1. the judge: a small CNN on the 8x8 ink, held-out accuracy reported (`digits-judge/`);
2. a tiny AutoencoderKL on the upsampled RGB images;
3. a tiny CLIP text encoder, taught to tell the digits apart and then frozen (as Stable
   Diffusion's CLIP comes pretrained and stays frozen);
4. a tiny UNet2DConditionModel on the VAE's latents, with prompts such as "a handwritten digit
   seven" (and some "", for classifier-free guidance) that are as noisy as web captions: 40%
   of the images get the prompt of a random digit. It draws every digit but follows the prompt
   only weakly (the judge agrees on about 32% of its samples): DDPO has something to sharpen;
5. the pipeline (DDIM scheduler, word-level tokenizer) saved with `save_pretrained` (`digits/`),
   reloaded, and judged with the sampling settings of `configs/digits.yaml`;
6. the flow-matching twin (`digits-flow/`, float32): a StableDiffusion3Pipeline on step 5's VAE,
   text encoder (as both CLIP encoders, no T5) and tokenizer, read back from `digits/`, with a tiny
   SD3Transformer2DModel trained by rectified flow on the same noisy captions and a
   FlowMatchEulerDiscreteScheduler (shift 3). Its text context is short: prompts of 8 CLIP tokens
   (the tokenizers' model_max_length) and one zero "T5 token" (`max_sequence_length=1`, which
   sampling must pass too: `ddpo.pipeline.BUILTIN_MAX_SEQUENCE_LENGTH`), not the pipeline's
   77 + 256. Reloaded and judged with 10 Euler steps like step 5 (the judge agrees on about 50% of
   its samples);
7. the second judge (`digits-judge-2/`), the held-out reward against reward hacking: the
   training split's digits themselves (checked against `digits-judge/heldout.npz`) as nearest
   neighbours, with a "none" answer beyond a distance (`rewards.digits.DigitNeighbours`). Its
   temperature and that distance are fitted on the training digits, each judged by the others
   (leave one out). Its held-out accuracy, and how often it names the same digit as judge 1 on
   the held-out digits and on `digits/`'s samples, are printed and recorded in its config.json
   (1 s of fitting, 28 s of sampling 1000 images);
8. the video twin (`digits-video/`, float32): a WanPipeline in miniature (a causal
   AutoencoderKLWan 2x in space and time, a 2-layer UMT5 encoder taught the digits and
   directions then frozen, a 4-block WanTransformer3DModel on 48 tokens a clip) trained by
   rectified flow on clips of 5 frames at 16x16 of the training split's digits moving left,
   right, up or down, with captions as noisy as the image models'. Judged by `digit_motion` with
   the sampling settings of `configs/digits_video.yaml` (1407 s of training on 2 cores while
   other jobs shared them, 21 s of judging 400 clips).

`--only flow` runs step 6 alone, on the judge, VAE and text encoder already in OUT, which it
leaves byte for byte; `--only digits` runs steps 1-5; `--only judge2` runs step 7 alone, on
OUT/digits-judge and OUT/digits; `--only video` runs step 8 alone, on OUT/digits-judge.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# idle OpenMP threads sleep instead of spinning: on a shared CPU, spinning threads that wait
# for a descheduled sibling made each step 10-40x slower
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL, AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
    StableDiffusion3Pipeline, StableDiffusionPipeline, UNet2DConditionModel, WanPipeline, WanTransformer3DModel,
)
from safetensors.torch import load_model, save_model  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import (  # noqa: E402
    CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, PreTrainedTokenizerFast, UMT5Config,
    UMT5EncoderModel,
)

from ddpo.config import load_config  # noqa: E402
from ddpo.rollout import sample_trajectories  # noqa: E402
from ddpo.pipeline import load_pipeline, sd_scheduler, word_level_tokenizer  # noqa: E402
from rewards.digits import (  # noqa: E402
    DIGIT_WORDS, DIRECTIONS, DigitClassifier, DigitJudge, DigitMotion, DigitNeighbours, digit_clips, judge_input,
    load_judge, prompted_digit, render_digits,
)


def digits_split(seed: int, test_fraction: float):
    """scikit-learn's 1797 digits split (stratified) into (train_x, train_y, test_x, test_y).
    scikit-learn is this script's own need (`pip install scikit-learn`): the package and its
    tests read the held-out split from OUT/digits-judge/heldout.npz."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    train_x, test_x, train_y, test_y = train_test_split(
        data.data, data.target, test_size=test_fraction, random_state=seed, stratify=data.target
    )
    return train_x, train_y, test_x, test_y


def shifted(images: np.ndarray, max_shift: int, rng: np.random.Generator) -> np.ndarray:
    """Each image moved by up to `max_shift` pixels each way, the border filled with white."""
    if max_shift == 0:
        return images
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (max_shift,) * 2, (max_shift,) * 2, (0, 0)), constant_values=255)
    dy, dx = rng.integers(0, 2 * max_shift + 1, (2, n))
    return np.stack([padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def train_judge(model: torch.nn.Module, j: dict, images: np.ndarray, labels: np.ndarray,
                test_images: np.ndarray, test_labels: np.ndarray, rng: np.random.Generator,
                ) -> tuple[torch.nn.Module, float]:
    """A judge trained with the settings `j` (its section of the settings) on images as the
    reward reads them (`judge_input`), and its accuracy on the test images."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=j["learning_rate"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, j["epochs"])
    labels = torch.as_tensor(labels)
    for _ in tqdm(range(j["epochs"]), desc=f"{type(model).__name__} judge (epochs)"):
        ink = judge_input(shifted(images, j["max_shift"], rng))
        ink = ink + j["noise"] * torch.randn_like(ink)
        for idx in torch.randperm(len(ink)).split(j["batch_size"]):
            loss = F.cross_entropy(model(ink[idx]), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
    model.eval()
    with torch.no_grad():
        predicted = model(judge_input(test_images)).argmax(dim=-1).numpy()
    return model, float((predicted == test_labels).mean())


def prompt_for(template: str, digit: int) -> str:
    return template.format(word=DIGIT_WORDS[digit], numeral=digit)


def caption_prompts(templates: list[str]) -> list[str]:
    """Every (digit, phrasing) prompt, digit-major, then "" (the last index)."""
    return [prompt_for(template, d) for d in range(10) for template in templates] + [""]


def noisy_captions(labels: torch.Tensor, num_templates: int, prompt_noise: float,
                   empty_fraction: float) -> torch.Tensor:
    """Indices into `caption_prompts` for images of these digits, as noisy as web captions: with
    probability prompt_noise the prompt of a random digit, in a random phrasing, and "" with
    probability empty_fraction (for classifier-free guidance)."""
    shape = labels.shape
    digits = torch.where(torch.rand(shape) < prompt_noise, torch.randint(0, 10, shape), labels)
    which = digits * num_templates + torch.randint(0, num_templates, shape)
    which[torch.rand(shape) < empty_fraction] = 10 * num_templates
    return which


def vocabulary(templates: list[str]) -> list[str]:
    words = {w for t in templates for w in t.split() if "{" not in w}
    return sorted(words) + DIGIT_WORDS + [str(d) for d in range(10)]


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1], as the VAE sees images."""
    return torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vae(s: dict, images: np.ndarray) -> AutoencoderKL:
    v = s["vae"]
    channels = tuple(v["block_out_channels"])
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=channels, norm_num_groups=8, sample_size=s["image_size"],
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
    )
    x = to_model_range(images)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=v["learning_rate"])
    for _ in tqdm(range(v["steps"]), desc="vae (steps)"):
        batch = x[torch.randint(0, len(x), (v["batch_size"],))]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        # ELBO with a light KL: reconstruction first, latents kept near N(0, I)
        loss = F.mse_loss(reconstruction, batch) + v["kl_weight"] * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vae.eval().requires_grad_(False)
    # scale the latents to unit variance, as Stable Diffusion's 0.18215
    with torch.no_grad():
        std = vae.encode(x).latent_dist.sample().std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return vae


def pretrain_text_encoder(t: dict, text_encoder: CLIPTextModel, input_ids: torch.Tensor,
                          prompt_digits: torch.Tensor) -> torch.Tensor:
    """Teach the text encoder to tell the digits apart (its token states, mean-pooled, classify
    the prompt's digit or ""), as Stable Diffusion's CLIP comes pretrained; then freeze it.
    Returns the frozen embeddings of the prompts, [P, 77, hidden]."""
    head = torch.nn.Linear(text_encoder.config.hidden_size, 11)
    optimizer = torch.optim.AdamW([*text_encoder.parameters(), *head.parameters()], lr=t["learning_rate"])
    for _ in tqdm(range(t["steps"]), desc="text encoder (steps)"):
        loss = F.cross_entropy(head(text_encoder(input_ids)[0].mean(dim=1)), prompt_digits)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    text_encoder.eval().requires_grad_(False)
    with torch.no_grad():
        return text_encoder(input_ids)[0]


def train_denoiser(s: dict, vae: AutoencoderKL, images: np.ndarray, labels: np.ndarray,
                   ) -> StableDiffusionPipeline:
    u, t = s["unet"], s["text_encoder"]
    tokenizer = word_level_tokenizer(vocabulary(s["prompts"]))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{k: t[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")},
    ))
    channels = tuple(u["block_out_channels"])
    unet = UNet2DConditionModel(
        sample_size=s["image_size"] // 2 ** (len(s["vae"]["block_out_channels"]) - 1),
        in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D",) * len(channels),
        up_block_types=("CrossAttnUpBlock2D",) * len(channels),
        cross_attention_dim=t["hidden_size"], attention_head_dim=u["attention_head_dim"],
        norm_num_groups=8,
    )
    scheduler = sd_scheduler()
    with torch.no_grad():
        posterior = vae.encode(to_model_range(images)).latent_dist
    mean, std = posterior.mean, posterior.std
    # every (digit, phrasing) prompt and "", tokenized as the pipeline does (padded to 77)
    templates = s["prompts"]
    prompts = caption_prompts(templates)
    input_ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids
    prompt_digits = torch.tensor([d for d in range(10) for _ in templates] + [10])  # 10: ""
    prompt_embeds = pretrain_text_encoder(t, text_encoder, input_ids, prompt_digits)
    labels = torch.as_tensor(labels)

    optimizer = torch.optim.AdamW(unet.parameters(), lr=u["learning_rate"])
    num_train_timesteps = scheduler.config.num_train_timesteps
    # captions as noisy as web data: with probability prompt_noise an image gets the prompt of a
    # random digit. The model learns p(x | c) = (1 - p) p(x | digit c) + p p(x): it draws every
    # digit well but follows the prompt only weakly, as evenly for each digit
    for _ in tqdm(range(u["steps"]), desc="unet (steps)"):
        idx = torch.randint(0, len(mean), (u["batch_size"],))
        latents = (mean[idx] + std[idx] * torch.randn_like(mean[idx])) * vae.config.scaling_factor
        which = noisy_captions(labels[idx], len(templates), u["prompt_noise"], u["empty_prompt_fraction"])
        # the denoising loss ||eps - eps_theta(sqrt(a_t) x_0 + sqrt(1 - a_t) eps, t, c)||^2
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, num_train_timesteps, idx.shape)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        loss = F.mse_loss(unet(noisy, timesteps, prompt_embeds[which]).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet.eval(),
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def sampled_images(model_dir: Path, config_path: Path, samples_per_prompt: int) -> list[tuple[str, np.ndarray]]:
    """(prompt, images) for each prompt of a DDPO config: the saved model (reloaded through
    from_pretrained) sampled with the config's sampling settings, seeds 10000 (k + 1) + i."""
    config = load_config(config_path)
    pipe = load_pipeline(str(model_dir))
    samples = []
    for k, prompt in enumerate(config.load_prompts()):
        seeds = [10_000 * (k + 1) + i for i in range(samples_per_prompt)]
        samples.append((prompt, sample_trajectories(pipe, [prompt] * len(seeds), seeds, config.sample).media.images))
    return samples


def judged_accuracy(model_dir: Path, judge_dir: Path, config_path: Path, samples_per_prompt: int) -> dict:
    """Sample the saved model (reloaded through from_pretrained) with a DDPO config's sampling
    settings and prompts; the judge's accuracy over all of them, and per prompt."""
    judge = DigitJudge(str(judge_dir))
    per_prompt = {}
    for prompt, images in sampled_images(model_dir, config_path, samples_per_prompt):
        _, info = judge(images, [prompt] * len(images), [{}] * len(images))
        per_prompt[prompt] = float(np.mean(info["correct"]))
    return {"accuracy": float(np.mean(list(per_prompt.values()))), "per_prompt": per_prompt}


# -- the flow-matching twin (builtin:digits-flow) -------------------------------------------------

def flow_pipeline(s: dict, digits_dir: Path) -> StableDiffusion3Pipeline:
    """An untrained SD3-shaped pipeline around the digits model's trained parts: its VAE (same
    weights, in float32, with SD3's shift_factor 0), its frozen text encoder as both CLIP encoders
    (with an identity text projection: the pooled output is the final-layer-normed end token, as in
    CLIP) and its word-level tokenizer, cut to `flow.tokenizer_max_length` tokens; no T5. A tiny
    SD3Transformer2DModel denoises the latents.

    The pipeline encodes a prompt as its CLIP tokens' states followed by `max_sequence_length` zero
    "T5 tokens" (256 by default; here `flow.max_sequence_length`, 1, which sampling must pass too).
    With the settings' 8 CLIP tokens the transformer attends over 9 text tokens beside the 64 image
    ones, not 77 + 256. CLIP's attention is causal, so the first tokens' states (and the end
    token's, the pooled output) are those it gives with 77: the text encoder stays the digits
    model's."""
    f, t = s["flow"], s["text_encoder"]
    # the same weights, in float32 (not through from_pretrained, whose config would record the folder)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(digits_dir / "vae"))
    load_model(vae, str(digits_dir / "vae" / "diffusion_pytorch_model.safetensors"))
    vae.eval().requires_grad_(False)
    # SD3 decodes latents / scaling_factor + shift_factor: the latents' mean is about -0.06 of
    # their std, so no shift, and the digits model's scaling (1 / std) unchanged
    vae.register_to_config(shift_factor=0.0)
    tokenizer = word_level_tokenizer(vocabulary(s["prompts"]), f["tokenizer_max_length"])
    # each prompt with its end token (the pooled output), within the pipeline's length
    longest = max(len(tokenizer(p).input_ids) for p in caption_prompts(s["prompts"]))
    if longest >= tokenizer.model_max_length:
        raise SystemExit(f"flow.tokenizer_max_length: a prompt has {longest} tokens; it must be at least "
                         f"{longest + 1} (the end token, whose state is the pooled output)")
    trained = PreTrainedTokenizerFast.from_pretrained(digits_dir / "tokenizer").get_vocab()
    if tokenizer.get_vocab() != trained:
        raise SystemExit(f"the prompts of {digits_dir}'s training differ from the settings' (its vocabulary)")
    clip = CLIPTextModel.from_pretrained(digits_dir / "text_encoder", dtype=torch.float32)
    hidden = t["hidden_size"]
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=clip.config.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=hidden,
        **{k: t[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")},
    ))
    text_encoder.text_model.load_state_dict(clip.state_dict())
    with torch.no_grad():
        text_encoder.text_projection.weight.copy_(torch.eye(hidden))
    text_encoder.eval().requires_grad_(False)
    latent_size = s["image_size"] // 2 ** (len(vae.config.block_out_channels) - 1)
    inner = f["num_attention_heads"] * f["attention_head_dim"]
    transformer = SD3Transformer2DModel(
        sample_size=latent_size, patch_size=f["patch_size"], in_channels=vae.config.latent_channels,
        out_channels=vae.config.latent_channels, num_layers=f["num_layers"],
        attention_head_dim=f["attention_head_dim"], num_attention_heads=f["num_attention_heads"],
        # the two CLIP encoders' token states side by side (T5's would be this wide too)
        joint_attention_dim=2 * hidden, caption_projection_dim=inner, pooled_projection_dim=2 * hidden,
        pos_embed_max_size=latent_size // f["patch_size"],
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=f["shift"])
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
        tokenizer=tokenizer, text_encoder_2=text_encoder, tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )


def rectified_flow_step(transformer, optimizer, schedule, x0: torch.Tensor, shift: float, **conditioning) -> None:
    """One step of the rectified-flow objective on clean latents x0 [B, ...]: x_t = (1 - sigma) x_0
    + sigma eps, sigma logit-normal (SD3's) then shifted as the scheduler shifts its sigmas, the
    transformer (at timestep 1000 sigma, with `conditioning`) regressing the velocity eps - x_0."""
    noise = torch.randn_like(x0)
    u = torch.sigmoid(torch.randn(x0.shape[0]))
    sigma = (shift * u / (1 + (shift - 1) * u)).view(-1, *[1] * (x0.dim() - 1))
    velocity = transformer(hidden_states=(1 - sigma) * x0 + sigma * noise, timestep=sigma.flatten() * 1000,
                           **conditioning).sample
    loss = F.mse_loss(velocity, noise - x0)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    schedule.step()


def train_flow(s: dict, digits_dir: Path, images: np.ndarray, labels: np.ndarray) -> StableDiffusion3Pipeline:
    """The rectified-flow objective (`rectified_flow_step`) on the digits model's latents and the
    same noisy captions."""
    f = s["flow"]
    pipe = flow_pipeline(s, digits_dir)
    transformer, vae = pipe.transformer, pipe.vae
    shift = pipe.scheduler.config.shift
    with torch.no_grad():
        posterior = vae.encode(to_model_range(images)).latent_dist
        prompts = caption_prompts(s["prompts"])
        # [P, 8 + 1, 2 hidden]: the CLIP tokens and the zero "T5 tokens", as the pipeline encodes them
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                                  max_sequence_length=f["max_sequence_length"])
    mean, std = posterior.mean, posterior.std
    labels = torch.as_tensor(labels)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=f["learning_rate"])
    # the rate decayed to 0 (cosine): the last steps average out the minibatch noise
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, f["steps"])
    transformer.train()
    for _ in tqdm(range(f["steps"]), desc="flow transformer (steps)"):
        idx = torch.randint(0, len(mean), (f["batch_size"],))
        latents = mean[idx] + std[idx] * torch.randn_like(mean[idx])
        x0 = (latents - vae.config.shift_factor) * vae.config.scaling_factor
        which = noisy_captions(labels[idx], len(s["prompts"]), f["prompt_noise"], f["empty_prompt_fraction"])
        rectified_flow_step(transformer, optimizer, schedule, x0, shift, encoder_hidden_states=embeds[which],
                            pooled_projections=pooled[which])
    transformer.eval().requires_grad_(False)
    return pipe


def judged_flow_accuracy(model_dir: Path, judge_dir: Path, config_path: Path, samples_per_prompt: int,
                         max_sequence_length: int, grid: Path | None = None) -> dict:
    """Sample the saved flow model (StableDiffusion3Pipeline.from_pretrained, its Euler sampler,
    with the `max_sequence_length` it was trained with) with a DDPO config's prompts, steps,
    guidance and size; the judge's accuracy, its mean probability of the prompted digit and its
    mean top probability. `grid`: a PNG of the samples, a row per prompt."""
    config = load_config(config_path)
    c = config.sample
    # model_index.json holds text_encoder_3 and tokenizer_3 as [null, null]; they are not among
    # the pipeline's optional components, so from_pretrained wants them passed as None
    pipe = StableDiffusion3Pipeline.from_pretrained(str(model_dir), text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    judge = DigitJudge(str(judge_dir))
    per_prompt, prompted, top, rows = {}, [], [], []
    for k, prompt in enumerate(config.load_prompts()):
        generators = [torch.Generator().manual_seed(10_000 * (k + 1) + i) for i in range(samples_per_prompt)]
        images = pipe([prompt] * samples_per_prompt, num_inference_steps=c.num_steps,
                      guidance_scale=c.guidance_scale, height=c.height, width=c.width,
                      max_sequence_length=max_sequence_length, generator=generators, output_type="np").images
        images = (images * 255).round().astype(np.uint8)
        reward, info = judge(images, [prompt] * len(images), [{}] * len(images))
        per_prompt[prompt] = float(np.mean(info["correct"]))
        prompted.append(reward)
        top.append(judge.probabilities(images).max(dim=-1).values.numpy())
        rows.append(np.concatenate([np.pad(x, ((2, 2), (2, 2), (0, 0)), constant_values=255)
                                    for x in images], axis=1))
    if grid is not None:
        from PIL import Image

        picture = np.concatenate(rows, axis=0)
        Image.fromarray(picture).resize((picture.shape[1] * 3, picture.shape[0] * 3), Image.NEAREST).save(grid)
    return {"accuracy": float(np.mean(list(per_prompt.values()))),
            "prompted_probability": float(np.concatenate(prompted).mean()),
            "top_probability": float(np.concatenate(top).mean()), "per_prompt": per_prompt}


def train_digits_and_judge(s: dict, out: Path, images, train_y, test_images, test_y) -> None:
    """Steps 1-5: the judge, the VAE, the text encoder and the UNet (OUT/digits-judge, OUT/digits)."""
    start = time.perf_counter()
    rng = np.random.default_rng(s["seed"])
    torch.manual_seed(s["seed"])  # each part from the seed: changing one leaves the others
    judge = DigitClassifier(tuple(s["judge"]["channels"]), s["judge"]["hidden"])
    judge, heldout_accuracy = train_judge(judge, s["judge"], images, train_y, test_images, test_y, rng)
    judge_dir = out / "digits-judge"
    judge_dir.mkdir(parents=True, exist_ok=True)
    save_model(judge, str(judge_dir / "model.safetensors"))
    (judge_dir / "config.json").write_text(json.dumps({
        "channels": s["judge"]["channels"], "hidden": s["judge"]["hidden"],
        "heldout_accuracy": heldout_accuracy, "seed": s["seed"], "test_fraction": s["test_fraction"],
        "image_size": s["image_size"], "trained_by": "scripts/train_digits.py",
    }, indent=2) + "\n")
    print(f"judge: held-out accuracy {heldout_accuracy:.4f} on {len(test_y)} digits")

    torch.manual_seed(s["seed"])
    vae = train_vae(s, images)
    torch.manual_seed(s["seed"])
    pipe = train_denoiser(s, vae, images, train_y)
    model_dir = out / "digits"
    # the weights rounded to float16 (the model the README's figures come from), stored in
    # float32: plain `from_pretrained(model_dir)` with no dtype then loads and samples on CPU
    pipe.to(dtype=torch.float16).to(dtype=torch.float32).save_pretrained(model_dir, safe_serialization=True)
    trained_s = time.perf_counter() - start
    e = s["evaluate"]
    result = judged_accuracy(model_dir, judge_dir, ROOT / e["config"], e["samples_per_prompt"])
    print(f"digits model: judged accuracy {result['accuracy']:.3f} with {e['config']}'s sampling "
          f"settings ({e['samples_per_prompt']} samples per prompt)")
    print(json.dumps(result["per_prompt"], indent=2))
    print(f"trained in {trained_s:.0f} s, evaluated in {time.perf_counter() - start - trained_s:.0f} s "
          f"({torch.get_num_threads()} threads)")


def train_digits_flow(s: dict, out: Path, images, train_y, grid: Path | None) -> None:
    """Step 6: the flow-matching twin on OUT/digits' VAE and text encoder (OUT/digits-flow),
    judged by OUT/digits-judge."""
    start = time.perf_counter()
    torch.manual_seed(s["seed"])
    pipe = train_flow(s, out / "digits", images, train_y)
    model_dir = out / "digits-flow"
    pipe.save_pretrained(model_dir, safe_serialization=True)  # float32: loads with no torch_dtype
    trained_s = time.perf_counter() - start
    e = s["flow"]["evaluate"]
    result = judged_flow_accuracy(model_dir, out / "digits-judge", ROOT / e["config"],
                                  e["samples_per_prompt"], s["flow"]["max_sequence_length"], grid)
    print(f"digits-flow model: judged accuracy {result['accuracy']:.3f}, mean probability of the "
          f"prompted digit {result['prompted_probability']:.3f}, mean top probability "
          f"{result['top_probability']:.3f} with {e['config']}'s prompts, steps, guidance and size "
          f"({e['samples_per_prompt']} samples per prompt)")
    print(json.dumps(result["per_prompt"], indent=2))
    print(f"trained in {trained_s:.0f} s, evaluated in {time.perf_counter() - start - trained_s:.0f} s "
          f"({torch.get_num_threads()} threads)")


# -- the video twin (builtin:digits-video) --------------------------------------------------------
# Phrasings of the direction: {direction} is the bare word ("left"), {towards} reads "to the left",
# "to the right", "up", "down"
TOWARDS = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}


def video_prompt_for(template: str, digit: int, direction: str) -> str:
    return template.format(word=DIGIT_WORDS[digit], numeral=digit, direction=direction, towards=TOWARDS[direction])


def video_caption_prompts(templates: list[str]) -> list[str]:
    """Every (digit, direction, phrasing) prompt, digit-major then direction, then "" (the last index)."""
    return [video_prompt_for(t, d, direction) for d in range(10) for direction in DIRECTIONS for t in templates] + [""]


def video_vocabulary(templates: list[str]) -> list[str]:
    words = {w for t in templates for w in t.split() if "{" not in w}
    words |= {w for phrase in TOWARDS.values() for w in phrase.split()} | set(DIRECTIONS)
    return sorted(words) + DIGIT_WORDS + [str(d) for d in range(10)]


def noisy_video_captions(digits: torch.Tensor, directions: torch.Tensor, num_templates: int, v: dict) -> torch.Tensor:
    """Indices into `video_caption_prompts` for clips of these digits and directions, as noisy as
    the image models' captions: the digit replaced by a random one with probability
    `digit_noise`, the direction (independently) with probability `direction_noise`, a random
    phrasing, and "" with probability `empty_prompt_fraction` (for classifier-free guidance)."""
    shape = digits.shape
    digits = torch.where(torch.rand(shape) < v["digit_noise"], torch.randint(0, 10, shape), digits)
    directions = torch.where(torch.rand(shape) < v["direction_noise"], torch.randint(0, 4, shape), directions)
    which = (digits * 4 + directions) * num_templates + torch.randint(0, num_templates, shape)
    which[torch.rand(shape) < v["empty_prompt_fraction"]] = 40 * num_templates
    return which


def clip_pool(v: dict, pixels: np.ndarray, labels: np.ndarray, rng: np.random.Generator):
    """Every training digit moving every way, `clips_per_direction` times (a random speed of
    `speeds` and place each): clips uint8 [N, F, H, W, 3], their digits [N] and directions [N]
    (indices into DIRECTIONS)."""
    repeat = 4 * v["clips_per_direction"]
    directions = np.tile(np.repeat(np.arange(4), v["clips_per_direction"]), len(pixels))
    speeds = rng.choice(v["speeds"], len(directions))
    clips = digit_clips(np.repeat(pixels, repeat, axis=0), [list(DIRECTIONS)[k] for k in directions], speeds,
                        v["num_frames"], v["size"], rng, v["spread"])
    return clips, torch.as_tensor(np.repeat(labels, repeat)), torch.as_tensor(directions)


def to_video_range(clips: np.ndarray) -> torch.Tensor:
    """uint8 [N, F, H, W, 3] -> float [N, 3, F, H, W] in [-1, 1], as the video VAE sees clips."""
    return torch.as_tensor(clips).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


@torch.no_grad()
def frame_by_frame(vae: AutoencoderKLWan) -> AutoencoderKLWan:
    """Start the causal VAE as an image autoencoder applied to each frame: every causal 3D
    convolution sees the current frame only (its taps on earlier frames zeroed), the encoder's
    temporal downsampling averages the two frames it merges and the decoder's temporal upsampling
    repeats each latent frame twice. Trained from random taps, the later latent frames stayed
    blobs long after the first (encoded alone) was sharp; from here, training on single frames
    first (cheap) teaches every frame, and the clips then teach the two-frame latents."""
    for name, module in vae.named_modules():
        if not isinstance(module, torch.nn.Conv3d) or module.kernel_size[0] != 3:
            continue
        module.weight[:, :, :2] = 0  # causal: taps 0 and 1 are the earlier frames
        if name.endswith("time_conv"):
            module.bias.zero_()
            eye = torch.eye(module.in_channels)
            if module.out_channels == module.in_channels:  # the encoder's: (previous, f_1, f_2) -> f_12
                module.weight[:, :, 1, 0, 0] = eye / 2
                module.weight[:, :, 2, 0, 0] = eye / 2
            else:  # the decoder's: one frame's channels -> two frames' (c channels each)
                module.weight[:, :, 2, 0, 0] = torch.cat([eye, eye])
    return vae


def decode_unclamped(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    """AutoencoderKLWan's decode (one latent frame at a time through the causal decoder and its
    caches) without its final clamp to [-1, 1]. Trained through the clamp, the VAE collapses to a
    white clip: the background's target is 1, where the clamp passes no gradient, and once the
    decoder overshoots 1 on the ink too nothing learns."""
    vae.clear_cache()
    x = vae.post_quant_conv(latents)
    frames = []
    for i in range(x.shape[2]):
        vae._conv_idx = [0]
        frames.append(vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                  first_chunk=i == 0))
    vae.clear_cache()
    return torch.cat(frames, dim=2)


def train_video_vae(a: dict, clips: np.ndarray) -> tuple[AutoencoderKLWan, torch.Tensor]:
    """A tiny causal video VAE (Wan 2.1's AutoencoderKLWan: one 2x downsampling in space and in
    time, so clips of 2k + 1 frames are k + 1 latent frames at half the size), started frame by
    frame (`frame_by_frame`) and trained on single frames for `image_steps`, then on the clips for
    `steps`. It is trained as an autoencoder of the posterior's mean, the latents the transformer
    learns (no KL term: the latents are normalised per channel afterwards, Wan's latents_mean and
    latents_std). The squared error counts ink `1 + ink_weight` times the paper: the strokes are a
    few pixels of each frame, and the judge reads each of them. Returns it and every clip's latents."""
    vae = frame_by_frame(AutoencoderKLWan(
        base_dim=a["base_dim"], z_dim=a["z_dim"], dim_mult=a["dim_mult"], num_res_blocks=1,
        temperal_downsample=a["temporal_downsample"], latents_mean=[0.0] * a["z_dim"], latents_std=[1.0] * a["z_dim"],
        # what the downsampling does: WanPipeline reads these
        scale_factor_spatial=2 ** (len(a["dim_mult"]) - 1), scale_factor_temporal=2 ** sum(a["temporal_downsample"])))
    steps = a["image_steps"] + a["steps"]
    optimizer = torch.optim.AdamW(vae.parameters(), lr=a["learning_rate"])
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    vae.train()
    for step in tqdm(range(steps), desc="video vae (steps: frames, then clips)"):
        batch = clips[torch.randint(0, len(clips), (a["batch_size"],)).numpy()]
        batch = to_video_range(batch[:, :1] if step < a["image_steps"] else batch)
        reconstruction = decode_unclamped(vae, vae.encode(batch).latent_dist.mode())
        ink = (1 - batch) / 2
        loss = ((reconstruction - batch).square() * (1 + a["ink_weight"] * ink)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(to_video_range(clips[i:i + 256])).latent_dist.mode()
                             for i in range(0, len(clips), 256)])
    vae.register_to_config(latents_mean=latents.mean(dim=(0, 2, 3, 4)).tolist(),
                           latents_std=latents.std(dim=(0, 2, 3, 4)).tolist())
    return vae, latents


def video_text_encoder(t: dict, tokenizer: PreTrainedTokenizerFast, prompts: list[str], digits: torch.Tensor,
                       directions: torch.Tensor, max_sequence_length: int) -> UMT5EncoderModel:
    """A tiny UMT5 encoder taught to tell the prompts' digits and directions apart (its token
    states, mean-pooled over the prompt's tokens, classify both, "" a class of each), then frozen,
    as Wan's UMT5 comes pretrained and stays frozen."""
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        **{k: t[k] for k in ("d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets")}))
    inputs = tokenizer(prompts, padding="max_length", max_length=max_sequence_length, truncation=True,
                       add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    mask = inputs.attention_mask[..., None].float()
    heads = torch.nn.ModuleList([torch.nn.Linear(t["d_model"], 11), torch.nn.Linear(t["d_model"], 5)])
    optimizer = torch.optim.AdamW([*text_encoder.parameters(), *heads.parameters()], lr=t["learning_rate"])
    for _ in tqdm(range(t["steps"]), desc="video text encoder (steps)"):
        states = text_encoder(inputs.input_ids, inputs.attention_mask).last_hidden_state
        pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        loss = F.cross_entropy(heads[0](pooled), digits) + F.cross_entropy(heads[1](pooled), directions)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return text_encoder.eval().requires_grad_(False)


def train_video(s: dict, pixels: np.ndarray, labels: np.ndarray) -> WanPipeline:
    """The video twin: clips of the training digits moving left, right, up or down; the VAE on
    them, the text encoder on their captions, then the transformer by the rectified-flow objective
    (`rectified_flow_step`, as `train_flow`) on the VAE's latents and the noisy captions."""
    v = s["video"]
    a, t, m = v["vae"], v["text_encoder"], v["transformer"]
    rng = np.random.default_rng(s["seed"])
    clips, clip_digits, clip_directions = clip_pool(v, pixels, labels, rng)
    print(f"video: {len(clips)} clips of {v['num_frames']} frames at {v['size']}x{v['size']}")
    vae, latents = train_video_vae(a, clips)

    templates = v["prompts"]
    tokenizer = word_level_tokenizer(video_vocabulary(templates), v["max_sequence_length"])
    prompts = video_caption_prompts(templates)
    longest = max(len(tokenizer(p).input_ids) for p in prompts)
    if longest > v["max_sequence_length"]:
        raise SystemExit(f"video.max_sequence_length: a prompt has {longest} tokens; it must be at least {longest}")
    prompt_digits = torch.tensor([d for d in range(10) for _ in range(4 * len(templates))] + [10])
    prompt_directions = torch.tensor([k for _ in range(10) for k in range(4) for _ in templates] + [4])
    text_encoder = video_text_encoder(t, tokenizer, prompts, prompt_digits, prompt_directions,
                                      v["max_sequence_length"])

    transformer = WanTransformer3DModel(
        patch_size=tuple(m["patch_size"]), num_attention_heads=m["num_attention_heads"],
        attention_head_dim=m["attention_head_dim"], in_channels=a["z_dim"], out_channels=a["z_dim"],
        text_dim=t["d_model"], freq_dim=m["freq_dim"], ffn_dim=m["ffn_dim"], num_layers=m["num_layers"],
        rope_max_seq_len=m["rope_max_seq_len"])
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=m["shift"])
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=scheduler)
    with torch.no_grad():
        # [P, max_sequence_length, d_model]: the prompts' token states zero-padded, as the pipeline encodes them
        embeds, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
                                       max_sequence_length=v["max_sequence_length"], device="cpu")
    view = (1, a["z_dim"], 1, 1, 1)
    latents_mean = torch.tensor(vae.config.latents_mean).view(view)
    latents_std = torch.tensor(vae.config.latents_std).view(view)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=m["learning_rate"])
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, m["steps"])
    shift = scheduler.config.shift
    transformer.train()
    for _ in tqdm(range(m["steps"]), desc="video transformer (steps)"):
        idx = torch.randint(0, len(latents), (m["batch_size"],))
        x0 = (latents[idx] - latents_mean) / latents_std
        which = noisy_video_captions(clip_digits[idx], clip_directions[idx], len(templates), v)
        rectified_flow_step(transformer, optimizer, schedule, x0, shift, encoder_hidden_states=embeds[which])
    transformer.eval().requires_grad_(False)
    return pipe


def judged_video_accuracy(model_dir: Path, judge_dir: Path, config_path: Path, samples_per_prompt: int,
                          max_sequence_length: int, grid: Path | None = None) -> dict:
    """Sample the saved video model (reloaded through from_pretrained, as the Wan family) with a
    DDPO config's prompts and sampling settings (seeds 10000 (k + 1) + i), scored by the
    `digit_motion` reward: the fraction of clips whose digit and motion are both right (and each
    alone), over all and per prompt. `grid`: a PNG of each prompt's first 4 clips, a row per
    prompt, the frames side by side."""
    config = load_config(config_path)
    model = load_pipeline(str(model_dir), max_sequence_length=max_sequence_length)
    judge = DigitMotion(str(judge_dir))
    per_prompt, found, rows = {}, {"correct": [], "digit_correct": [], "motion_correct": []}, []
    for k, prompt in enumerate(config.load_prompts()):
        seeds = [10_000 * (k + 1) + i for i in range(samples_per_prompt)]
        frames = sample_trajectories(model, [prompt] * len(seeds), seeds, config.sample).media.frames
        _, info = judge(frames, [prompt] * len(seeds), [{}] * len(seeds))
        per_prompt[prompt] = float(np.mean(info["correct"]))
        for key in found:
            found[key] += info[key]
        rows.append(np.concatenate([np.pad(np.concatenate(list(clip), axis=1), ((2, 2), (4, 4), (0, 0)),
                                           constant_values=128) for clip in frames[:4]], axis=1))
    if grid is not None:
        from PIL import Image

        picture = np.concatenate(rows, axis=0)
        Image.fromarray(picture).resize((picture.shape[1] * 3, picture.shape[0] * 3), Image.NEAREST).save(grid)
    return {"accuracy": float(np.mean(found["correct"])), "digit_accuracy": float(np.mean(found["digit_correct"])),
            "motion_accuracy": float(np.mean(found["motion_correct"])), "per_prompt": per_prompt}


def train_digits_video(s: dict, out: Path, pixels: np.ndarray, labels: np.ndarray, grid: Path | None) -> None:
    """Step 8: the video twin (OUT/digits-video), judged by OUT/digits-judge through `digit_motion`."""
    start = time.perf_counter()
    torch.manual_seed(s["seed"])
    pipe = train_video(s, pixels, labels)
    model_dir = out / "digits-video"
    pipe.save_pretrained(model_dir, safe_serialization=True)  # float32: loads with no torch_dtype
    trained_s = time.perf_counter() - start
    v = s["video"]
    e = v["evaluate"]
    result = judged_video_accuracy(model_dir, out / "digits-judge", ROOT / e["config"], e["samples_per_prompt"],
                                   v["max_sequence_length"], grid)
    print(f"digits-video model: judged accuracy (digit and motion right) {result['accuracy']:.3f}; digit "
          f"{result['digit_accuracy']:.3f}, motion {result['motion_accuracy']:.3f} with {e['config']}'s prompts and "
          f"sampling settings ({e['samples_per_prompt']} clips per prompt)")
    print(json.dumps(result["per_prompt"], indent=2))
    print(f"trained in {trained_s:.0f} s, evaluated in {time.perf_counter() - start - trained_s:.0f} s "
          f"({torch.get_num_threads()} threads)")


# -- the second judge (digit_judge_2) -------------------------------------------------------------

def fit_second_judge(j: dict, images: np.ndarray, labels: np.ndarray, test_images: np.ndarray,
                     test_labels: np.ndarray) -> tuple[DigitNeighbours, float]:
    """Judge 2 on the training digits: they are its prototypes. Each training digit judged by
    the others (leave one out) sets the rest: `reject_distance` is the `reject_quantile` of their
    distances to the nearest other digit (that share of real digits is called "none"), and the
    temperature, of `temperatures`, the one of the least leave-one-out log loss. Returns it and
    its accuracy on the test images ("none" counts as wrong)."""
    judge = DigitNeighbours(len(images))
    judge.prototypes.copy_(judge_input(images).flatten(1))
    judge.labels.copy_(torch.as_tensor(labels))
    with torch.no_grad():
        squared = (judge.prototypes[:, None, :] - judge.prototypes[None]).square().sum(-1)
        squared.fill_diagonal_(float("inf"))  # leave one out
        distances = torch.stack([squared[:, judge.labels == c].min(dim=1).values for c in range(10)], dim=1)
        judge.reject_distance.fill_(float(torch.quantile(distances.min(dim=1).values, j["reject_quantile"])))
        rows = torch.arange(len(labels))

        def log_loss(temperature: float) -> float:
            judge.temperature.fill_(temperature)
            logits = -torch.cat([distances, judge.reject_distance.expand(len(distances), 1)], dim=1) / temperature
            return float(-torch.log_softmax(logits, dim=1)[rows, judge.labels].mean())

        judge.temperature.fill_(min(j["temperatures"], key=log_loss))
        answers = judge(judge_input(test_images)).argmax(dim=-1).numpy()
    return judge.eval(), float((answers == test_labels).mean())


def judges_agreement(judge_1: torch.nn.Module, judge_2: torch.nn.Module, images: np.ndarray,
                     digits: np.ndarray) -> dict:
    """How often the two judges name the same digit (`agree`), each one's accuracy against
    `digits` (the true or prompted ones), and judge 2's where judge 1 is right."""
    with torch.no_grad():
        answer_1, answer_2 = (judge(judge_input(images)).argmax(dim=-1).numpy() for judge in (judge_1, judge_2))
    correct_1, correct_2 = answer_1 == digits, answer_2 == digits
    return {"agree": float((answer_1 == answer_2).mean()), "accuracy_1": float(correct_1.mean()),
            "accuracy_2": float(correct_2.mean()),
            "accuracy_2_where_1_right": float(correct_2[correct_1].mean())}


def train_digits_judge_2(s: dict, out: Path, images, train_y, test_images, test_y) -> None:
    """Step 7: the second judge (OUT/digits-judge-2), compared with OUT/digits-judge on the
    held-out digits and on OUT/digits' samples."""
    start = time.perf_counter()
    j = s["judge_2"]
    judge, heldout_accuracy = fit_second_judge(j, images, train_y, test_images, test_y)
    trained_s = time.perf_counter() - start
    judge_1, _ = load_judge(out / "digits-judge")
    heldout = judges_agreement(judge_1, judge, test_images, test_y)
    e = j["evaluate"]
    samples = sampled_images(out / "digits", ROOT / e["config"], e["samples_per_prompt"])
    prompted = np.array([prompted_digit(prompt) for prompt, images in samples for _ in images])
    sampled = judges_agreement(judge_1, judge, np.concatenate([images for _, images in samples]), prompted)
    judge_dir = out / "digits-judge-2"
    judge_dir.mkdir(parents=True, exist_ok=True)
    save_model(judge, str(judge_dir / "model.safetensors"))
    (judge_dir / "config.json").write_text(json.dumps({
        "architecture": "nearest_neighbour", "num_prototypes": len(train_y),
        "temperature": float(judge.temperature), "reject_distance": float(judge.reject_distance),
        "reject_quantile": j["reject_quantile"], "heldout_accuracy": heldout_accuracy,
        "split_seed": s["seed"], "test_fraction": s["test_fraction"],
        "heldout": "digits-judge/heldout.npz", "image_size": s["image_size"],
        # argmax agreement with digit_judge, on the held-out digits and on digits/' samples
        "agreement_with_digit_judge": {"heldout": heldout["agree"], "digits_samples": sampled["agree"]},
        "trained_by": "scripts/train_digits.py",
    }, indent=2) + "\n")
    print(f"judge 2: held-out accuracy {heldout_accuracy:.4f} on {len(test_y)} digits (judge 1: "
          f"{heldout['accuracy_1']:.4f}); the judges agree on {heldout['agree']:.4f} of them")
    print(f"on {len(prompted)} samples of {out / 'digits'} ({e['config']}'s settings) the judges agree on "
          f"{sampled['agree']:.3f}; judged accuracy {sampled['accuracy_1']:.3f} (judge 1), "
          f"{sampled['accuracy_2']:.3f} (judge 2), {sampled['accuracy_2_where_1_right']:.3f} (judge 2 "
          "where judge 1 is right)")
    print(f"trained in {trained_s:.0f} s, evaluated in {time.perf_counter() - start - trained_s:.0f} s "
          f"({torch.get_num_threads()} threads)")


def check_heldout(judge_dir: Path, test_x: np.ndarray, test_y: np.ndarray) -> None:
    """The settings' split is the one whose held-out digits judge_dir/heldout.npz holds: a
    judge trained on another split would have seen some of them."""
    with np.load(judge_dir / "heldout.npz") as heldout:
        if not (np.array_equal(heldout["x"], test_x.astype(np.uint8)) and np.array_equal(heldout["y"], test_y)):
            raise SystemExit(f"seed, test_fraction: the settings' held-out split is not {judge_dir}/heldout.npz's "
                             "(the one the judges and models were trained without)")


def save_heldout(judge_dir: Path, test_x: np.ndarray, test_y: np.ndarray) -> None:
    """The held-out digits beside the judge (`rewards.digits.load_heldout`), as uint8."""
    np.savez_compressed(judge_dir / "heldout.npz", x=test_x.astype(np.uint8), y=test_y.astype(np.uint8))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", type=Path, default=ROOT / "ddpo" / "assets" / "train_digits.yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "ddpo" / "assets",
                        help="writes OUT/digits-judge, OUT/digits, OUT/digits-flow and OUT/digits-judge-2")
    parser.add_argument("--only", choices=["digits", "flow", "judge2", "video"],
                        help="digits: steps 1-5 only; flow: step 6 only, on the judge, VAE and text "
                             "encoder already in OUT (which it leaves as they are); judge2: step 7 "
                             "only, the second judge, beside OUT/digits-judge and OUT/digits; video: "
                             "step 8 only, the video twin, judged by OUT/digits-judge")
    parser.add_argument("--flow-grid", type=Path, help="a PNG of the flow model's judged samples")
    parser.add_argument("--video-grid", type=Path, help="a PNG of the video model's judged clips")
    args = parser.parse_args(argv)
    s = yaml.safe_load(args.settings.read_text())
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(s["threads"])

    train_x, train_y, test_x, test_y = digits_split(s["seed"], s["test_fraction"])
    images, test_images = render_digits(train_x, s["image_size"]), render_digits(test_x, s["image_size"])
    if args.only in (None, "digits"):
        train_digits_and_judge(s, args.out, images, train_y, test_images, test_y)
        save_heldout(args.out / "digits-judge", test_x, test_y)
    if args.only in (None, "flow"):
        train_digits_flow(s, args.out, images, train_y, args.flow_grid)
    if args.only in (None, "judge2"):
        check_heldout(args.out / "digits-judge", test_x, test_y)
        train_digits_judge_2(s, args.out, images, train_y, test_images, test_y)
    if args.only in (None, "video"):
        check_heldout(args.out / "digits-judge", test_x, test_y)  # the judges' split: never its held-out digits
        train_digits_video(s, args.out, train_x, train_y, args.video_grid)


if __name__ == "__main__":
    main()
