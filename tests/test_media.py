"""One type for what a family decodes (images, or videos' frames): exact round trips through
files and Arrow, the MP4s `ddpo sample` writes, the grids' stills and animations (files and
TensorBoard), and the reward call by the medium a reward declares."""

import io

import av
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from cluster.run_dir import RunRecorder, before_after, sample_grid, sample_grids, write_grid
from ddpo import media as media_module
from ddpo.media import Media, mp4_scale
from ddpo.trajectory import media_column, media_of
from rewards import RewardError, compute_reward

RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, (3, 16, 24, 3), dtype=np.uint8)
VIDEOS = RNG.integers(0, 256, (2, 5, 16, 24, 3), dtype=np.uint8)


def _table(media: Media, prompts: list[str]) -> pa.Table:
    batch = pa.RecordBatch.from_pydict({"prompt": prompts}).append_column(*media_column(media))
    return pa.Table.from_batches([batch, batch])  # two batches join under one schema


@pytest.mark.parametrize("media", [Media.from_images(IMAGES), Media.from_videos(VIDEOS, fps=8)])
def test_files_and_arrow_give_back_the_same_pixels(media, tmp_path):
    again = Media.decode(media.encode(), media.medium, media.fps)
    np.testing.assert_array_equal(again.frames, media.frames)
    table = _table(media, ["p"] * len(media))
    read = media_of(table)
    assert (read.medium, read.fps, len(read)) == (media.medium, media.fps, 2 * len(media))
    np.testing.assert_array_equal(read.frames[:len(media)], media.frames)
    if media.medium == "image":  # a video's file is an MP4: test_a_video_is_saved_as_an_mp4_that_plays_back
        path = media.save(1, tmp_path / "sample")
        assert path.suffix == ".png"
        np.testing.assert_array_equal(Media.decode([path.read_bytes()]).frames[0], media.frames[1])


def test_an_image_is_one_frame_and_a_video_has_no_images():
    images = Media.from_images(IMAGES)
    assert images.frames.shape == (3, 1, 16, 24, 3)
    np.testing.assert_array_equal(images.images, IMAGES)
    np.testing.assert_array_equal(images.stills(), IMAGES)
    np.testing.assert_array_equal(images[1:].images, IMAGES[1:])
    videos = Media.from_videos(VIDEOS, fps=8)
    with pytest.raises(ValueError, match="videos, not images"):
        videos.images
    # a video's still: its first, middle and last frames side by side
    np.testing.assert_array_equal(videos.stills(), np.concatenate([VIDEOS[:, 0], VIDEOS[:, 2], VIDEOS[:, 4]], axis=2))


@pytest.mark.parametrize("build, message", [
    (lambda: Media(IMAGES[:, None].astype(np.float32)), "uint8"),
    (lambda: Media(VIDEOS), "one frame"),
    (lambda: Media(VIDEOS, "video"), "fps > 0"),
    (lambda: Media(IMAGES[:, None], "image", 8.0), "fps > 0"),
    (lambda: Media(IMAGES[:, None], "audio"), "medium must be"),
    (lambda: Media.concat([Media.from_images(IMAGES), Media.from_videos(VIDEOS, 8)]), "different kinds"),
])
def test_malformed_media_are_refused(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_tables_written_before_the_media_column_still_read():
    old = pa.table({"prompt": ["p"] * 3, "image_png": Media.from_images(IMAGES).encode()})
    np.testing.assert_array_equal(media_of(old).images, IMAGES)


def test_a_grid_shows_videos_as_their_stills():
    images = sample_grid(_table(Media.from_images(IMAGES), ["a", "b", "c"]), max_images=3, cols=3)
    videos = sample_grid(_table(Media.from_videos(VIDEOS, 8), ["a", "b"]), max_images=2, cols=2)
    # a cell 128 px high; an image's is as wide as its aspect, a video's three frames wide
    assert images.width == 3 * 192 and videos.width == 2 * 3 * 192
    assert images.height == videos.height == 128 + 36


def _mean_brightness(images, prompts, metadata):
    return images.reshape(len(images), -1).mean(axis=1), {}


def _motion(frames, prompts, metadata):
    return np.abs(np.diff(frames.astype(np.float32), axis=1)).mean(axis=(1, 2, 3, 4)), {}


_motion.medium = "video"


def test_a_reward_gets_the_medium_it_declares_and_refuses_another():
    images, videos = Media.from_images(IMAGES), Media.from_videos(VIDEOS, fps=8)
    rewards, _ = compute_reward("brightness", _mean_brightness, images, ["p"] * 3, [{}] * 3)
    np.testing.assert_allclose(rewards, IMAGES.reshape(3, -1).mean(axis=1), rtol=1e-6)
    rewards, _ = compute_reward("motion", _motion, videos, ["p"] * 2, [{}] * 2)
    np.testing.assert_allclose(rewards, np.abs(np.diff(VIDEOS.astype(np.float32), axis=1)).mean(axis=(1, 2, 3, 4)),
                               rtol=1e-6)
    # an image reward on clips scores their frames (tests/test_video_rewards.py); the reverse is refused
    rewards, _ = compute_reward("brightness", _mean_brightness, videos, ["p"] * 2, [{}] * 2)
    np.testing.assert_allclose(rewards, VIDEOS.reshape(2, 5, -1).mean(axis=2).mean(axis=1), rtol=1e-6)
    with pytest.raises(RewardError, match="^reward 'motion' scores videos, and the model makes images"):
        compute_reward("motion", _motion, images, ["p"] * 3, [{}] * 3)


# -- MP4s (`ddpo sample`) -----------------------------------------------------------------


def _smooth_clip(frames: int, height: int, width: int) -> np.ndarray:
    """A soft bright blob moving across a gradient: what a video model makes, not noise (which
    no lossy codec keeps close)."""
    y, x = np.mgrid[:height, :width]
    clip = []
    for t in range(frames):
        blob = np.exp(-((y - height / 2) ** 2 + (x - width * (0.25 + 0.5 * t / frames)) ** 2) / (2 * (height / 5) ** 2))
        clip.append(np.stack([255 * blob, 30 + 200 * (1 - blob) * y / height, 60 + 100 * blob * x / width], -1))
    return np.stack(clip).round().astype(np.uint8)


def _read_mp4(path) -> tuple[np.ndarray, float, str]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(stream)])
        return frames, float(stream.average_rate), stream.codec_context.name


@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])  # mpeg4: a PyAV without H.264
@pytest.mark.parametrize("height, width", [(16, 16), (15, 17)])
def test_a_video_is_saved_as_an_mp4_that_plays_back(codec, height, width, tmp_path, monkeypatch):
    monkeypatch.setattr(media_module, "mp4_codec", lambda: codec)
    clips = np.stack([_smooth_clip(6, height, width), _smooth_clip(6, height, width)[::-1]])
    path = Media.from_videos(clips, fps=16).save(1, tmp_path / "clip")
    assert path == tmp_path / "clip.mp4"
    frames, fps, name = _read_mp4(path)
    factor = mp4_scale(height, width)  # 16x16 -> 64x64; 15x17 -> 90x102: even sides for yuv420p
    assert (factor, name, fps) == ({16: 4, 15: 6}[height], {"libx264": "h264", "mpeg4": "mpeg4"}[codec], 16.0)
    assert frames.shape == (6, height * factor, width * factor, 3)
    # lossy: H.264 at CRF 18 (MPEG-4 at quantiser 2-4) and the round trip through 4:2:0 YUV move
    # a pixel by about 2.5 of 255 on average on this clip, a few by up to 25 at the blob's edge
    error = np.abs(frames.astype(int) - clips[1].repeat(factor, axis=1).repeat(factor, axis=2))
    assert error.mean() < 4 and error.max() <= 32, (error.mean(), error.max())


def test_the_mp4_keeps_a_large_clips_size_and_a_fractional_fps(tmp_path):
    clip = _smooth_clip(3, 64, 96)
    path = Media.from_videos(clip[None], fps=24000 / 1001).save(0, tmp_path / "clip")
    frames, fps, _ = _read_mp4(path)
    assert frames.shape == (3, 64, 96, 3) and fps == pytest.approx(23.976, abs=1e-3)


# -- animated grids --------------------------------------------------------------------------


def _scored_table(media: Media) -> pa.Table:
    rows = len(media)
    batch = pa.RecordBatch.from_pydict({"batch_id": ["b0"] * rows, "seed": list(range(rows)),
                                        "policy_version": [0] * rows, "prompt": [f"p{i}" for i in range(rows)]})
    return pa.Table.from_batches([batch.append_column(*media_column(media))])


def test_a_video_grid_plays_its_clips_in_step_beside_the_stills(tmp_path):
    videos = Media.from_videos(VIDEOS, 8)
    grid = sample_grids(_table(videos, ["a", "b"]), max_images=2, cols=2)
    assert grid.still.tobytes() == sample_grid(_table(videos, ["a", "b"]), max_images=2, cols=2).tobytes()
    # one picture per frame, a cell per clip (one frame wide, 128 high), every cell at frame t
    assert len(grid.frames) == 5 and grid.frames[0].size == (2 * 192, 128 + 36)
    for t, frame in enumerate(grid.frames):
        cell = np.asarray(frame)[:128, 192:384]
        np.testing.assert_array_equal(cell, np.asarray(Image.fromarray(VIDEOS[1, t]).resize((192, 128), Image.NEAREST)))
    gif = write_grid(grid, tmp_path / "grid")
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
    assert gif == (tmp_path / "grid.gif").read_bytes()
    played = Image.open(io.BytesIO(gif))
    # 8 fps: a delay of 12/100 s, GIF's nearest
    assert (played.n_frames, played.size, played.info["duration"], played.info["loop"]) == (5, (384, 164), 120, 0)
    shorter = sample_grids(_table(Media.from_videos(VIDEOS[:, :3], 8), ["a", "b"]), 2, cols=2)
    both = before_after(grid, shorter)
    assert len(both.frames) == 5 and both.frames[0].size == (2 * 384 + 16, 164)
    # the shorter clips hold their last frame
    assert np.asarray(both.frames[4])[:, 400:].tobytes() == np.asarray(both.frames[2])[:, 400:].tobytes()
    # images: stills only, no GIF
    assert write_grid(sample_grids(_table(Media.from_images(IMAGES), ["a", "b", "c"])), tmp_path / "images") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.gif", "grid.png", "images.png"]


@pytest.mark.parametrize("media", [Media.from_images(IMAGES), Media.from_videos(VIDEOS, fps=8)])
def test_the_run_records_a_videos_animated_grid_in_files_and_tensorboard(media, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for sub in ("samples", "trajectories"):
        (tmp_path / sub).mkdir()
    recorder = RunRecorder(tmp_path)
    try:
        table = _scored_table(media)
        recorder.record_epoch(0, 0, table, [(np.zeros(len(media), np.float32), {})], {}, 0,
                              lambda: {"time_epoch_s": 1.0})
        for when in ("before", "after"):
            recorder.record_eval(when, 0, table.append_column("reward", pa.array([0.5] * len(media))))
    finally:
        recorder.tensorboard.close()
    video = media.medium == "video"
    assert (tmp_path / "samples" / "epoch_0000.png").is_file() and (tmp_path / "before_after.png").is_file()
    assert (tmp_path / "samples" / "epoch_0000.gif").is_file() == video == (tmp_path / "before_after.gif").is_file()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert len(events.Images("samples")) == 1
    assert ("samples_animated" in events.Tags()["images"]) == video
    if video:  # an image summary whose encoded bytes are the GIF, as TensorBoard's video summary
        (event,) = events.Images("samples_animated")
        assert event.encoded_image_string == (tmp_path / "samples" / "epoch_0000.gif").read_bytes()
        assert (event.width, event.height) == Image.open(tmp_path / "samples" / "epoch_0000.gif").size
