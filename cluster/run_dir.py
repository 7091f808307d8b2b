"""The run directory `runs/<name>/`: resolved config, metrics.jsonl, sample grids, trajectories
(Parquet) and checkpoints. Written by the driver; shared by the Ray run and the in-process one."""

from __future__ import annotations

import io
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from ddpo.config import Config, save_config
from ddpo.errors import ConfigError
from ddpo.media import Media
from ddpo.trajectory import media_of, read_parquet, write_parquet

# the rollout/train log-prob mismatch (max |ratio - 1|) above which a run warns: ten times the
# design's 1e-4 log-prob contract
MISMATCH_WARN = 1e-3


def make_run_dir(config: Config) -> Path:
    name = config.run_name or time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(config.output_dir) / name
    if (run_dir / "metrics.jsonl").exists():
        raise ConfigError(f"run_name: '{run_dir}' already holds a run; choose another run_name")
    for sub in ("samples", "trajectories", "checkpoints"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    return run_dir


def is_checkpoint_epoch(config: Config, epoch: int) -> bool:
    every = config.checkpoint_every
    return (every > 0 and (epoch + 1) % every == 0) or epoch + 1 == config.num_epochs


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint with the most epochs trained, or None."""
    found = sorted((run_dir / "checkpoints").glob("epoch_*/learner_state.json"))
    return found[-1].parent if found else None


def resume_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint to go on from: the latest one whose epoch the run's record (metrics.jsonl)
    holds. A checkpoint is written just before its epoch's record; a run killed in between
    (SIGKILL, an OOM, a stop at once) leaves it ahead of the record, and going on from it would
    leave that epoch out of the record for good: the one before is taken, the epoch redone.
    With no record to go by, the latest."""
    found = sorted(path.parent for path in (run_dir / "checkpoints").glob("epoch_*/learner_state.json"))
    recorded = {m["epoch"] for m in read_metrics(run_dir)}
    caught_up = [path for path in found if int(path.name.removeprefix("epoch_")) in recorded]
    return (caught_up or found or [None])[-1]


def _metrics_lines(run_dir: Path) -> list[str]:
    """metrics.jsonl's lines, but a last one cut short (its writer ended, or was killed, while
    writing it)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    try:
        json.loads(lines[-1] if lines else "{}")
    except ValueError:
        lines.pop()
    return lines


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in _metrics_lines(run_dir)]


def truncate_metrics(run_dir: Path, num_epochs: int) -> None:
    """Keep the metrics of the first `num_epochs` epochs: a resumed run redoes the rest (a
    last line cut short goes too)."""
    path = run_dir / "metrics.jsonl"
    if path.exists():
        lines = [line for line in _metrics_lines(run_dir) if json.loads(line)["epoch"] < num_epochs]
        path.write_text("".join(line + "\n" for line in lines))


def append_metrics(run_dir: Path, metrics: dict) -> None:
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(clean) + "\n")


def with_rewards(table: pa.Table, rewards: np.ndarray, info: dict[str, list], column: str = "reward") -> pa.Table:
    """The epoch's rows with their reward (float64: the very values the learner trained on) and
    the reward's per-image extras (`info.<key>`); `column="heldout"`: the held-out reward
    (`reward.heldout`) and its extras (`heldout_info.<key>`)."""
    table = table.append_column(column, pa.array(rewards, pa.float64()))
    prefix = "info." if column == "reward" else f"{column}_info."
    for key, values in info.items():
        table = table.append_column(f"{prefix}{key}", pa.array(values))
    return table


def write_trajectories(run_dir: Path, epoch: int, table: pa.Table) -> None:
    write_parquet(table, run_dir / "trajectories" / f"epoch_{epoch:04d}.parquet")


def _answer(table: pa.Table, row: int) -> str:
    """The reward's `answer` for a row (a VLM's answer, a judge's label), or ''."""
    names = [n for n in table.column_names if n == "info.answer" or n.endswith(".answer")]
    return str(table.column(names[0])[row].as_py()) if names else ""


Caption = tuple[str, float | None, str]  # a grid cell's prompt, reward (or None) and answer
# an animated grid's cells are at most this high: 16 clips of 33 frames of 480x832 make a GIF of
# 4.3 MB in about 2 s on 2 cores at 256, and full-height cells would have 3.5 times the pixels
ANIMATED_CELL_MAX_HEIGHT = 256


@dataclass
class Grid:
    """The sample grid of a table's first rows: `still`, a picture, and for clips `frames`, the
    animated grid's pictures (every cell at the same frame of its clip), shown at `fps`."""

    still: Image.Image
    frames: list[Image.Image]  # empty for images
    fps: float | None


def _captions(table: pa.Table) -> list[Caption]:
    prompts = table.column("prompt").to_pylist()
    rewards = table.column("reward").to_pylist() if "reward" in table.column_names else [None] * len(prompts)
    return [(prompt, reward, _answer(table, i)) for i, (prompt, reward) in enumerate(zip(prompts, rewards))]


def _draw_grid(pictures: np.ndarray, captions: list[Caption], title: str | None, cols: int, height: int,
               resample: int = Image.NEAREST) -> Image.Image:
    """uint8 pictures [N, h, w, 3] in cells `height` high, `cols` a row, each captioned with its
    prompt, its reward (when there is one) and the reward's answer (when it gives one)."""
    caption, top = 36, 16 if title else 0
    width = round(height * pictures.shape[2] / pictures.shape[1])
    cols = min(cols, len(pictures))
    rows = math.ceil(len(pictures) / cols)
    grid = Image.new("RGB", (cols * width, top + rows * (height + caption)), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((4, 2), title, fill="black")
    for i, (picture, (prompt, reward, answer)) in enumerate(zip(pictures, captions)):
        x, y = (i % cols) * width, top + (i // cols) * (height + caption)
        grid.paste(Image.fromarray(picture).resize((width, height), resample), (x, y))
        draw.text((x + 2, y + height + 1), prompt[:24], fill="black")
        if reward is not None:
            draw.text((x + 2, y + height + 12), f"r={reward:.3f}", fill="black")
        draw.text((x + 2, y + height + 23), answer[:24], fill="darkblue")
    return grid


def _animated(media: Media, captions: list[Caption], title: str | None, cols: int) -> list[Image.Image]:
    """The animated grid's pictures, one per frame: every cell shows its clip's frame t. Cells as
    high as the stills' up to ANIMATED_CELL_MAX_HEIGHT (nearest neighbour up, box filter down)."""
    frame_height = media.frames.shape[2]
    height = min(max(128, frame_height), ANIMATED_CELL_MAX_HEIGHT)
    resample = Image.NEAREST if height >= frame_height else Image.BOX
    return [_draw_grid(media.frames[:, t], captions, title, cols, height, resample)
            for t in range(media.frames.shape[1])]


def sample_grids(table: pa.Table, max_images: int = 16, title: str | None = None, cols: int = 4,
                 animated: bool = True) -> Grid:
    """The grid of the first samples, `cols` a row, each captioned with its prompt, its reward
    (when the table has a `reward` column) and the reward's answer when it gives one. A video's
    still is its first, middle and last frames side by side (`Media.stills`); its animated grid
    (unless not `animated`) plays the clips in step."""
    table = table.slice(0, max_images)
    media, captions = media_of(table), _captions(table)
    stills = media.stills()
    still = _draw_grid(stills, captions, title, cols, max(128, stills.shape[1]))
    frames = _animated(media, captions, title, cols) if animated and media.medium == "video" else []
    return Grid(still, frames, media.fps)


def sample_grid(table: pa.Table, max_images: int = 16, title: str | None = None, cols: int = 4) -> Image.Image:
    """The still picture of `sample_grids`."""
    return sample_grids(table, max_images, title, cols, animated=False).still


def gif_bytes(frames: list[Image.Image], fps: float) -> bytes:
    """Pictures as an animated GIF that loops, at about `fps`: GIF counts a frame's delay in
    whole 1/100 s, so 16 fps plays at 16.7 (6/100 s a frame) and 8 fps at 8.3."""
    # each frame to its own 256 colours by fast octree, undithered: Pillow's default median cut
    # took 11 s for a grid of 16 clips of 33 frames of 480x832 on 2 cores, this 2 s
    paletted = [frame.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE) for frame in frames]
    buffer = io.BytesIO()
    delay_ms = 10 * max(1, round(100 / fps))
    paletted[0].save(buffer, format="GIF", save_all=True, append_images=paletted[1:], duration=delay_ms, loop=0)
    return buffer.getvalue()


def write_grid(grid: Grid, stem: Path) -> bytes | None:
    """`<stem>.png`, the still grid, and for clips `<stem>.gif`, the animated one, whose bytes it
    returns (None for images)."""
    grid.still.save(stem.with_name(stem.name + ".png"))
    if not grid.frames:
        return None
    data = gif_bytes(grid.frames, grid.fps)
    stem.with_name(stem.name + ".gif").write_bytes(data)
    return data


def _side_by_side(left: Image.Image, right: Image.Image) -> Image.Image:
    both = Image.new("RGB", (left.width + 16 + right.width, max(left.height, right.height)), "white")
    both.paste(left, (0, 0))
    both.paste(right, (left.width + 16, 0))
    return both


def before_after(before: Grid, after: Grid) -> Grid:
    """Two grids side by side: the still ones, and the animated ones frame by frame (a shorter
    clip holds its last frame)."""
    still = _side_by_side(before.still, after.still)
    if not (before.frames and after.frames):
        return Grid(still, [], None)
    def at(grid: Grid, t: int) -> Image.Image:
        return grid.frames[min(t, len(grid.frames) - 1)]

    count = max(len(before.frames), len(after.frames))
    return Grid(still, [_side_by_side(at(before, t), at(after, t)) for t in range(count)], after.fps)


def add_gif(writer, tag: str, data: bytes, size: tuple[int, int], step: int) -> None:
    """An animated GIF logged to a SummaryWriter as an image summary whose encoded bytes are the
    GIF, which TensorBoard's images dashboard plays: what `add_video` writes, without the
    moviepy it needs to encode. `size` is the GIF's (width, height)."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    image = Summary.Image(height=size[1], width=size[0], colorspace=3, encoded_image_string=data)
    # the writer's own event file, through the accessor its add_video uses
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)


def reward_summary(table: pa.Table) -> dict[str, float]:
    """reward_mean/std, and the mean of each numeric extra of the reward as `<key>_mean` (a
    judge's `correct` gives `correct_mean`, its accuracy); the same for a held-out reward's
    columns, as `heldout_reward_mean`, `heldout_<key>_mean`."""
    summary = {}
    for column, prefix, name in (("reward", "info.", ""), ("heldout", "heldout_info.", "heldout_")):
        if column not in table.column_names:
            continue
        rewards = table.column(column).to_numpy()
        summary.update({f"{name}reward_mean": float(rewards.mean()), f"{name}reward_std": float(rewards.std())})
        for field in table.schema:
            numeric = pa.types.is_integer(field.type) or pa.types.is_floating(field.type) or pa.types.is_boolean(field.type)
            if field.name.startswith(prefix) and numeric:
                values = table.column(field.name).to_numpy(zero_copy_only=False).astype(np.float64)
                summary[f"{name}{field.name[len(prefix):]}_mean"] = float(values.mean())
    return summary


def eval_metrics(table: pa.Table) -> dict[str, float]:
    """The eval batch's summary as an epoch's metrics: `eval_reward_mean`, `eval_<key>_mean`,
    and the held-out reward's as `heldout_reward_mean`, `heldout_<key>_mean`."""
    return {key if key.startswith("heldout_") else f"eval_{key}": value
            for key, value in reward_summary(table).items()}


def write_curves(run_dir: Path) -> None:
    """`curves.png`: reward (mean +- std), loss and approx_kl over the epochs so far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = read_metrics(run_dir)
    epochs = [m["epoch"] for m in history]
    mean = np.array([m["reward_mean"] for m in history])
    std = np.array([m["reward_std"] for m in history])
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    axes[0].plot(epochs, mean, label="samples")
    axes[0].fill_between(epochs, mean - std, mean + std, alpha=0.2)
    evals = [m for m in history if "eval_reward_mean" in m]
    if evals:  # the eval batch every eval_every epochs: the trained reward, and the held-out one
        axes[0].plot([m["epoch"] for m in evals], [m["eval_reward_mean"] for m in evals], "o-", label="eval batch")
        axes[0].legend(loc="upper left", fontsize=7)
    heldout = [m for m in evals if "heldout_reward_mean" in m]
    if heldout:  # on an axis of its own: another reward's scale
        other = axes[0].twinx()
        other.plot([m["epoch"] for m in heldout], [m["heldout_reward_mean"] for m in heldout], "s--",
                   color="tab:red", label="held-out (eval batch)")
        other.set_ylabel("held-out reward", color="tab:red")
        other.legend(loc="lower right", fontsize=7)
    for ax, key in zip(axes, ["reward_mean", "loss", "approx_kl"]):
        if key != "reward_mean":
            ax.plot(epochs, [np.nan if m[key] is None else m[key] for m in history])
        ax.set_title(key)
        ax.set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=80)
    plt.close(fig)


def start_tensorboard(logdir: Path) -> str:
    """TensorBoard for `logdir`, served on 127.0.0.1 at a free port from a daemon thread of this
    process (it stops when the process ends); returns its URL."""
    from tensorboard import program

    board = program.TensorBoard()
    board.configure(argv=[None, "--logdir", str(logdir), "--host", "127.0.0.1", "--port", "0",
                          "--reload_interval", "2", "--load_fast", "false"])
    return board.launch()


class RunRecorder:
    """Writes each epoch into the run directory: trajectories (Parquet), the sample grid (and
    for clips its animated GIF beside it), the metrics line, TensorBoard scalars and grids
    (`tensorboard/`), and the curves PNG (every
    `CURVES_EVERY` epochs and at the end: drawing it costs the driver more than the rest of
    the epoch's record, and TensorBoard has the live curves)."""

    CURVES_EVERY = 10

    def __init__(self, run_dir: Path, num_devices: int = 1):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = run_dir
        self.num_devices = num_devices  # that sample or train: for images_per_device_s
        self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        self.curves_stale = False
        self.mismatch_warned = False

    def restart_at(self, epoch: int) -> None:
        """Go on from `epoch` (a resume, a restarted learner group): the metrics of later epochs
        are dropped, and TensorBoard hides its events of those steps (`purge_step`)."""
        from torch.utils.tensorboard import SummaryWriter

        truncate_metrics(self.run_dir, epoch)
        self.tensorboard.close()
        self.tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=epoch)

    def close(self) -> None:
        if self.curves_stale:
            write_curves(self.run_dir)
            self.curves_stale = False
        self.tensorboard.close()

    def record_epoch(self, epoch: int, policy_version: int, table: pa.Table,
                     scored: list[tuple[np.ndarray, dict[str, list]]], learner_metrics: dict,
                     dropped_stale: int, timings: Callable[[], dict[str, float]]) -> dict:
        """Write the epoch's record; return its metrics. `timings` is asked for the epoch's times
        once its samples and grid are written: the metrics line that holds them, and the curves
        and TensorBoard after it, fall in the next epoch's `time_epoch_s`."""
        run_dir = self.run_dir
        rewards = np.concatenate([r for r, _ in scored])
        info = {key: [v for _, i in scored for v in i[key]] for key in scored[0][1]}
        table = with_rewards(table, rewards, info)
        write_trajectories(run_dir, epoch, table)
        grid = sample_grids(table)
        gif = write_grid(grid, run_dir / "samples" / f"epoch_{epoch:04d}")
        timings = timings()
        metrics = {
            "epoch": epoch,
            "policy_version": policy_version,
            **reward_summary(table),
            "approx_kl": learner_metrics.get("approx_kl", float("nan")),
            "clipfrac": learner_metrics.get("clipfrac", float("nan")),
            "loss": learner_metrics.get("loss", float("nan")),
            "samples_per_s": learner_metrics.get("num_samples", 0) / timings["time_epoch_s"],
            # the field's throughput: images sampled (and trained on) per device-second of the epoch
            "images_per_device_s": table.num_rows / (timings["time_epoch_s"] * self.num_devices),
            "policy_lag_mean": learner_metrics.get("policy_lag_mean", float("nan")),
            "dropped_stale": dropped_stale,
            **timings,
            **{k: v for k, v in learner_metrics.items() if k not in ("approx_kl", "clipfrac", "loss")},
        }
        append_metrics(run_dir, metrics)
        self.warn_on_mismatch(epoch, metrics.get("logprob_mismatch_max"))
        self.curves_stale = (epoch + 1) % self.CURVES_EVERY != 0
        if not self.curves_stale:
            write_curves(run_dir)
        for key, value in metrics.items():
            if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                self.tensorboard.add_scalar(key, value, epoch)
        self.tensorboard.add_image("samples", np.asarray(grid.still), epoch, dataformats="HWC")
        if gif is not None:  # clips: the grid that plays them, beside the stills
            add_gif(self.tensorboard, "samples_animated", gif, grid.frames[0].size, epoch)
        self.tensorboard.flush()
        return metrics

    def warn_on_mismatch(self, epoch: int, mismatch: float | None) -> None:
        """One warning line the first epoch the learner's recomputed log-probs disagree with the
        samplers' by more than MISMATCH_WARN (max |ratio - 1| before any update): the ratio then
        measures the two processes' numerics, not the policy's change."""
        if mismatch is None or not mismatch > MISMATCH_WARN or self.mismatch_warned:
            return
        self.mismatch_warned = True
        print(f"warning: epoch {epoch}: the learner's log-probs of the sampled steps differ from the samplers' "
              f"(max |ratio - 1| = {mismatch:.1e} > {MISMATCH_WARN:g} before any update, logprob_mismatch_max); "
              "likely causes: model.dtype float16/bfloat16 (try float32 for the LoRA forward), train.cfg differing "
              "from sampling, or another attention backend on the learner's device", file=sys.stderr, flush=True)

    def record_eval(self, when: str, policy_version: int, table: pa.Table) -> None:
        """The fixed eval batch (`ddpo.plan.eval_plan`) `before` training or `after` it:
        `samples/eval_<when>.parquet`, and once both exist `before_after.png` (for clips also
        `before_after.gif`, animated) and `eval.json`."""
        write_parquet(table.append_column("eval_policy_version", pa.array([policy_version] * table.num_rows)),
                      self.run_dir / "samples" / f"eval_{when}.parquet")
        paths = {w: self.run_dir / "samples" / f"eval_{w}.parquet" for w in ("before", "after")}
        if when != "after" or not paths["before"].exists():
            return
        tables = {w: read_parquet(path) for w, path in paths.items()}
        summaries = {w: reward_summary(t) for w, t in tables.items()}
        grids = [sample_grids(t, title=f"{w}: policy version {t.column('eval_policy_version')[0].as_py()}, "
                                       f"reward mean {summaries[w]['reward_mean']:.3f}")
                 for w, t in tables.items()]
        write_grid(before_after(*grids), self.run_dir / "before_after")
        (self.run_dir / "eval.json").write_text(json.dumps(summaries, indent=1) + "\n")
