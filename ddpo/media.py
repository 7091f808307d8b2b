"""What a model family's decoder makes: images, or videos (frames). One type carries both
through the trajectories (Arrow), the reward call, the sample grids and the files `ddpo sample`
writes; a family names its medium (`ModelFamily.medium`).

An image is stored as PNG, a video as a lossless animated WebP: both decode to the very pixels
that were encoded, so a reward scores the same values wherever it runs. The files `ddpo sample`
writes are PNG for an image and MP4 (H.264) for a video, which every player opens.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from ddpo.errors import UserError

MEDIUMS = ("image", "video")
SUFFIX = {"image": ".png", "video": ".mp4"}  # what `Media.save` writes
# an MP4's shorter side is scaled up (nearest neighbour, by an integer factor) to at least this:
# H.264 keeps colour at half resolution (yuv420p), which smears a tiny clip's pixels together
MP4_MIN_SIDE = 64
MP4_CRF = 18  # x264's "visually lossless" quality


@dataclass(frozen=True)
class Media:
    """A batch of B samples as uint8 RGB frames [B, F, H, W, 3]: one frame per image, F per video
    shown at `fps` frames per second."""

    frames: np.ndarray
    medium: str = "image"
    fps: float | None = None

    def __post_init__(self):
        if self.medium not in MEDIUMS:
            raise ValueError(f"medium must be one of {MEDIUMS}, got {self.medium!r}")
        if self.frames.dtype != np.uint8 or self.frames.ndim != 5 or self.frames.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 [B, F, H, W, 3], got {self.frames.dtype} {self.frames.shape}")
        if self.medium == "image" and self.frames.shape[1] != 1:
            raise ValueError(f"an image is one frame, got {self.frames.shape[1]}")
        if (self.medium == "video") != (self.fps is not None and self.fps > 0):
            raise ValueError(f"a video has fps > 0 and an image none, got {self.medium} at fps {self.fps}")

    @classmethod
    def from_images(cls, images: np.ndarray) -> Media:
        """uint8 images [B, H, W, 3]."""
        return cls(np.asarray(images)[:, None])

    @classmethod
    def from_videos(cls, frames: np.ndarray, fps: float) -> Media:
        """uint8 frames [B, F, H, W, 3]."""
        return cls(np.asarray(frames), "video", float(fps))

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, rows) -> Media:
        """The samples at `rows` (a slice or indices)."""
        return Media(self.frames[rows], self.medium, self.fps)

    @property
    def images(self) -> np.ndarray:
        """uint8 images [B, H, W, 3]; a video has none (see `stills`)."""
        if self.medium != "image":
            raise ValueError(f"these samples are {self.medium}s, not images")
        return self.frames[:, 0]

    def stills(self, frames_per_video: int = 3) -> np.ndarray:
        """One picture per sample [B, H, W', 3], for grids: the image itself, or a video's first,
        middle and last frames side by side."""
        if self.medium == "image":
            return self.images
        count = self.frames.shape[1]
        picks = np.unique(np.linspace(0, count - 1, min(frames_per_video, count)).round().astype(int))
        return np.concatenate([self.frames[:, i] for i in picks], axis=2)

    @staticmethod
    def concat(parts: list[Media]) -> Media:
        kinds = {(part.medium, part.fps) for part in parts}
        if len(kinds) != 1:
            raise ValueError(f"cannot join media of different kinds: {sorted(kinds, key=str)}")
        return Media(np.concatenate([part.frames for part in parts]), parts[0].medium, parts[0].fps)

    # -- files and bytes ------------------------------------------------------------------

    def encode(self) -> list[bytes]:
        """Each sample as a file's bytes: PNG for an image, lossless animated WebP for a video."""
        return [_encode(sample, self.medium, self.fps) for sample in self.frames]

    @classmethod
    def decode(cls, data: list[bytes], medium: str = "image", fps: float | None = None) -> Media:
        return cls(np.stack([_decode(item) for item in data]), medium, fps)

    def save(self, index: int, stem: str | Path) -> Path:
        """Sample `index` written to `stem` + the medium's suffix: a PNG image, or an MP4 video
        (`write_mp4`); returns the path."""
        path = Path(str(stem) + SUFFIX[self.medium])
        if self.medium == "image":
            path.write_bytes(_encode(self.frames[index], self.medium, self.fps))
        else:
            write_mp4(self.frames[index], self.fps, path)
        return path


def _encode(frames: np.ndarray, medium: str, fps: float | None) -> bytes:
    buffer = io.BytesIO()
    pictures = [Image.fromarray(frame) for frame in frames]
    if medium == "image":
        pictures[0].save(buffer, format="PNG")
    else:
        pictures[0].save(buffer, format="WEBP", save_all=True, append_images=pictures[1:], lossless=True,
                         duration=round(1000 / fps), loop=0)
    return buffer.getvalue()


def _decode(data: bytes) -> np.ndarray:
    """A file's frames, uint8 [F, H, W, 3]."""
    picture = Image.open(io.BytesIO(data))
    frames = []
    for i in range(getattr(picture, "n_frames", 1)):
        picture.seek(i)
        frames.append(np.asarray(picture.convert("RGB")))
    return np.stack(frames)


def mp4_scale(height: int, width: int) -> int:
    """The integer factor a clip is scaled up by in its MP4: the shorter side to at least
    MP4_MIN_SIDE, and both sides even (yuv420p halves them for colour; libx264 refuses odd ones)."""
    factor = max(1, math.ceil(MP4_MIN_SIDE / min(height, width)))
    return factor + 1 if (height * factor) % 2 or (width * factor) % 2 else factor


def _av():
    """PyAV, imported here and not at the top: only `ddpo sample` writes MP4s."""
    try:
        import av
    except ImportError:
        raise UserError("writing a video as MP4 needs PyAV: pip install 'av>=14'") from None
    return av


def mp4_codec() -> str:
    """libx264 (H.264) where this PyAV build has it, else MPEG-4 part 2 (FFmpeg's own encoder)."""
    return "libx264" if "libx264" in _av().codecs_available else "mpeg4"


def write_mp4(frames: np.ndarray, fps: float, path: str | Path) -> None:
    """A clip (uint8 [F, H, W, 3]) as an MP4 at `fps`: H.264 (libx264, CRF 18) in yuv420p, as
    players expect, or MPEG-4 part 2 where this PyAV has no H.264 encoder. Lossy. A small or
    odd-sized clip is scaled up by the integer factor `mp4_scale` (nearest neighbour, every pixel
    a block): a 16x16 clip is written as 64x64, a 15x17 one as 90x102."""
    av = _av()
    factor = mp4_scale(*frames.shape[1:3])
    frames = frames.repeat(factor, axis=1).repeat(factor, axis=2)
    codec = mp4_codec()
    with av.open(str(path), "w", format="mp4") as container:
        # a fraction, so that an NTSC rate (23.976) stays exact (24000/1001)
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        # MPEG-4 part 2 has no CRF: its quantiser held at 2-4 (of 31) is about as close
        stream.options = {"crf": str(MP4_CRF)} if codec == "libx264" else {"qmin": "2", "qmax": "4"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # the frames the encoder still holds
