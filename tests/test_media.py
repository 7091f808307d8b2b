"""One type for what a family decodes (images, or videos' frames): exact round trips through
files and Arrow, the grids' stills, and the reward call by the medium a reward declares."""

import numpy as np
import pyarrow as pa
import pytest

from cluster.run_dir import sample_grid
from ddpo.media import Media
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
    path = media.save(1, tmp_path / "sample")
    assert path.suffix == {"image": ".png", "video": ".webp"}[media.medium]
    np.testing.assert_array_equal(Media.decode([path.read_bytes()], media.medium, media.fps).frames[0],
                                  media.frames[1])


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
    with pytest.raises(RewardError, match="^reward 'brightness' scores images, and the model makes videos"):
        compute_reward("brightness", _mean_brightness, videos, ["p"] * 2, [{}] * 2)
    with pytest.raises(RewardError, match="^reward 'motion' scores videos, and the model makes images"):
        compute_reward("motion", _motion, images, ["p"] * 3, [{}] * 3)
