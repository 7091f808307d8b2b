"""Where one clip stops fitting one device: the memory plan (ddpo/memory.py, `ddpo plan`) of
Wan 2.1 T2V 1.3B over clip lengths and sizes, one sample per device.

    python bench/video_plan.py                                # the table of docs/video.md
    python bench/video_plan.py --frames 33,81 --sizes 480x832 --config configs/wan21_1_3b.yaml --json
    python bench/video_plan.py --model 14b                    # the 14B transformer (same UMT5, VAE)

Each point is `ddpo plan` of the config (default configs/wan21_1_3b.yaml: bfloat16, LoRA r 32,
CFG in sampling and training) with one clip a sample batch and a training batch
(sample.batch_size and train.batch_size 1: every denoiser forward holds the clip twice, its
conditional and unconditional halves), gradient checkpointing on and the text encoder offloaded
once the prompts are encoded (model.offload_text_encoders): the least one colocated device holds
for a sample without splitting it. Nothing loads: the shipped configs of the model on the meta
device, a few seconds a point on a CPU.

Columns: the clip's latent frames x h x w, its tokens after the 1 x 2 x 2 patches, the
activations of a sampling forward, a VAE decode, a training forward + backward with / without
gradient checkpointing (GiB), the device's peak with / without it (the steady state or the start-up
with the text encoder, whichever is larger; the CUDA context not included), and whether that fits
an H100 80GB (79.6 GiB, nvidia-smi's 81559 MiB) and an H200 (140.4 GiB, 143771 MiB) with the
plan's 0.5 GiB of CUDA context.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ddpo.config import load_config
from ddpo.memory import CUDA_CONTEXT_BYTES, GIB, MODEL_CONFIGS, plan_memory

DEVICES = {"H100 80GB": 81559 * 2**20, "H200": 143771 * 2**20}
FRAMES = [1, 17, 33, 49, 81, 121, 241]
SIZES = ["240x416", "480x832", "720x1280"]
ONE_CLIP = ["sample.batch_size=1", "sample.num_batches_per_epoch=4", "train.batch_size=1",
            "train.gradient_checkpointing=true", "model.offload_text_encoders=true"]


def wan_14b_folder(folder: Path) -> Path:
    """Wan 2.1 T2V 14B's configs in `folder`: the shipped 1.3B's (the same UMT5-XXL, VAE and
    scheduler) with the 14B transformer's sizes of diffusers' scripts/convert_wan_to_diffusers.py
    (40 layers of 40 heads x 128, feed-forward 13824)."""
    shutil.copytree(MODEL_CONFIGS / "Wan-AI--Wan2.1-T2V-1.3B-Diffusers", folder, dirs_exist_ok=True)
    transformer = folder / "transformer" / "config.json"
    config = json.loads(transformer.read_text())
    config.update(num_layers=40, num_attention_heads=40, ffn_dim=13824)
    transformer.write_text(json.dumps(config, indent=2) + "\n")
    return folder


def point(config_path: Path, frames: int, size: str, overrides: tuple[str, ...] = (),
          patch: tuple[int, int] = (2, 2)) -> dict:
    """The plan's figures for one clip of `frames` frames at `size` ("HxW")."""
    height, width = (int(v) for v in size.split("x"))
    config = load_config(config_path, [*ONE_CLIP, *overrides, f"sample.num_frames={frames}",
                                       f"sample.height={height}", f"sample.width={width}"])
    plan = plan_memory(config)
    device = plan.devices[0]
    _, latent_frames, h, w = plan.latent_shape
    # the same device without gradient checkpointing: its training activations in place of the run's
    without = max(device.startup_bytes, device.total_bytes - device.activation_bytes
                  + max(device.sampling_bytes, device.decode_bytes, device.training_bytes_full))
    peaks = {"": device.peak_bytes, " (no ckpt)": without}

    def gib(n: int) -> float:
        return round(n / GIB, 2)

    return {"frames": frames, "size": size, "latents": [latent_frames, h, w],
            "tokens": latent_frames * (h // patch[0]) * (w // patch[1]),
            "sampling_gib": gib(device.sampling_bytes), "decode_gib": gib(device.decode_bytes),
            "training_checkpointed_gib": gib(device.training_bytes_checkpointed),
            "training_gib": gib(device.training_bytes_full), "weights_gib": gib(device.weights_bytes),
            "startup_gib": gib(device.startup_bytes), "peak_gib": gib(device.peak_bytes),
            "peak_no_ckpt_gib": gib(without),
            **{f"fits {name}{kind}": peak + CUDA_CONTEXT_BYTES <= memory
               for kind, peak in peaks.items() for name, memory in DEVICES.items()}}


def table(rows: list[dict]) -> str:
    """The points as a markdown table: GiB, and the devices it fits with / without checkpointing."""
    header = ["frames", "size", "latents f x h x w", "tokens", "sampling", "decode", "training ckpt / no ckpt",
              "peak ckpt / no ckpt", *(f"{name} ckpt / no ckpt" for name in DEVICES)]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        fits = [" / ".join("yes" if r[f"fits {name}{kind}"] else "no" for kind in ("", " (no ckpt)"))
                for name in DEVICES]
        cells = [r["frames"], r["size"], " x ".join(map(str, r["latents"])), r["tokens"], r["sampling_gib"],
                 r["decode_gib"], f"{r['training_checkpointed_gib']} / {r['training_gib']}",
                 f"{r['peak_gib']} / {r['peak_no_ckpt_gib']}", *fits]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "wan21_1_3b.yaml")
    parser.add_argument("--frames", default=",".join(map(str, FRAMES)), help="clip lengths, 4k + 1")
    parser.add_argument("--sizes", default=",".join(SIZES), help="HxW, multiples of 16")
    parser.add_argument("--model", choices=["1.3b", "14b"], default="1.3b",
                        help="14b: the 14B transformer on the same text encoder and VAE (`wan_14b_folder`)")
    parser.add_argument("--json", action="store_true", help="one JSON object a point instead of the table")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        overrides = (f"model.pretrained={wan_14b_folder(Path(tmp))}",) if args.model == "14b" else ()
        rows = [point(args.config, int(frames), size, overrides) for size in args.sizes.split(",")
                for frames in args.frames.split(",")]
    print("\n".join(json.dumps(r) for r in rows) if args.json else table(rows))
    return rows


if __name__ == "__main__":
    main()
