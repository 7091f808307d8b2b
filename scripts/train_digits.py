"""Train the embedded digits model (`builtin:digits`) and its judge (`digit_judge`) from
scikit-learn's bundled 8x8 handwritten digits. Seeded and deterministic on CPU; 220 s on
2 cores.

    python scripts/train_digits.py [--settings ddpo/assets/train_digits.yaml] [--out ddpo/assets]

1. the judge: a small CNN on the 8x8 ink, held-out accuracy reported (`digits-judge/`);
2. a tiny AutoencoderKL on the upsampled RGB images;
3. a tiny CLIP text encoder, taught to tell the digits apart and then frozen (as Stable
   Diffusion's CLIP comes pretrained and stays frozen);
4. a tiny UNet2DConditionModel on the VAE's latents, with prompts such as "a handwritten digit
   seven" (and some "", for classifier-free guidance) that are as noisy as web captions: 40%
   of the images get the prompt of a random digit. It draws every digit but follows the prompt
   only weakly (the judge agrees on about 32% of its samples): DDPO has something to sharpen;
5. the pipeline (DDIM scheduler, word-level tokenizer) saved with `save_pretrained` (`digits/`),
   reloaded, and judged with the sampling settings of `configs/digits.yaml`.
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
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from safetensors.torch import save_model  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from ddpo.config import load_config  # noqa: E402
from ddpo.diffusion import sample_trajectories  # noqa: E402
from ddpo.pipeline import load_pipeline, sd_scheduler, word_level_tokenizer  # noqa: E402
from rewards.digits import (  # noqa: E402
    DIGIT_WORDS, DigitClassifier, DigitJudge, digits_split, judge_input, render_digits,
)


def shifted(images: np.ndarray, max_shift: int, rng: np.random.Generator) -> np.ndarray:
    """Each image moved by up to `max_shift` pixels each way, the border filled with white."""
    if max_shift == 0:
        return images
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (max_shift,) * 2, (max_shift,) * 2, (0, 0)), constant_values=255)
    dy, dx = rng.integers(0, 2 * max_shift + 1, (2, n))
    return np.stack([padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def train_judge(s: dict, images: np.ndarray, labels: np.ndarray, test_images: np.ndarray,
                test_labels: np.ndarray, rng: np.random.Generator) -> tuple[DigitClassifier, float]:
    j = s["judge"]
    model = DigitClassifier(tuple(j["channels"]), j["hidden"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=j["learning_rate"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, j["epochs"])
    labels = torch.as_tensor(labels)
    for _ in tqdm(range(j["epochs"]), desc="judge (epochs)"):
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
    prompts = [prompt_for(template, d) for d in range(10) for template in templates] + [""]
    input_ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids
    prompt_digits = torch.tensor([d for d in range(10) for _ in templates] + [10])  # 10: ""
    prompt_embeds = pretrain_text_encoder(t, text_encoder, input_ids, prompt_digits)
    empty = len(prompts) - 1
    labels = torch.as_tensor(labels)

    optimizer = torch.optim.AdamW(unet.parameters(), lr=u["learning_rate"])
    num_train_timesteps = scheduler.config.num_train_timesteps
    # captions as noisy as web data: with probability prompt_noise an image gets the prompt of a
    # random digit. The model learns p(x | c) = (1 - p) p(x | digit c) + p p(x): it draws every
    # digit well but follows the prompt only weakly, as evenly for each digit
    for _ in tqdm(range(u["steps"]), desc="unet (steps)"):
        idx = torch.randint(0, len(mean), (u["batch_size"],))
        latents = (mean[idx] + std[idx] * torch.randn_like(mean[idx])) * vae.config.scaling_factor
        digits = torch.where(torch.rand(idx.shape) < u["prompt_noise"],
                             torch.randint(0, 10, idx.shape), labels[idx])
        # prompt index: a random phrasing of the digit, or "" with probability empty_prompt_fraction
        which = digits * len(templates) + torch.randint(0, len(templates), idx.shape)
        which[torch.rand(idx.shape) < u["empty_prompt_fraction"]] = empty
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


def judged_accuracy(model_dir: Path, judge_dir: Path, config_path: Path, samples_per_prompt: int) -> dict:
    """Sample the saved model (reloaded through from_pretrained) with a DDPO config's sampling
    settings and prompts; the judge's accuracy over all of them, and per prompt."""
    config = load_config(config_path)
    c = config.sample
    pipe = load_pipeline(str(model_dir))
    judge = DigitJudge(str(judge_dir))
    per_prompt = {}
    for k, prompt in enumerate(config.load_prompts()):
        seeds = [10_000 * (k + 1) + i for i in range(samples_per_prompt)]
        images = sample_trajectories(pipe, [prompt] * len(seeds), seeds, c.num_steps,
                                     c.guidance_scale, c.eta, c.height, c.width).images
        _, info = judge(images, [prompt] * len(seeds), [{}] * len(seeds))
        per_prompt[prompt] = float(np.mean(info["correct"]))
    return {"accuracy": float(np.mean(list(per_prompt.values()))), "per_prompt": per_prompt}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", type=Path, default=ROOT / "ddpo" / "assets" / "train_digits.yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "ddpo" / "assets",
                        help="writes OUT/digits and OUT/digits-judge")
    args = parser.parse_args(argv)
    s = yaml.safe_load(args.settings.read_text())
    start = time.perf_counter()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(s["threads"])
    rng = np.random.default_rng(s["seed"])

    train_x, train_y, test_x, test_y = digits_split(s["seed"], s["test_fraction"])
    images, test_images = render_digits(train_x, s["image_size"]), render_digits(test_x, s["image_size"])

    torch.manual_seed(s["seed"])  # each part from the seed: changing one leaves the others
    judge, heldout_accuracy = train_judge(s, images, train_y, test_images, test_y, rng)
    judge_dir = args.out / "digits-judge"
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
    model_dir = args.out / "digits"
    # stored in float16 (half the size); `from_pretrained(torch_dtype=...)` loads it in any dtype
    pipe.to(dtype=torch.float16).save_pretrained(model_dir, safe_serialization=True)
    trained_s = time.perf_counter() - start
    e = s["evaluate"]
    result = judged_accuracy(model_dir, judge_dir, ROOT / e["config"], e["samples_per_prompt"])
    print(f"digits model: judged accuracy {result['accuracy']:.3f} with {e['config']}'s sampling "
          f"settings ({e['samples_per_prompt']} samples per prompt)")
    print(json.dumps(result["per_prompt"], indent=2))
    print(f"trained in {trained_s:.0f} s, evaluated in {time.perf_counter() - start - trained_s:.0f} s "
          f"({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
