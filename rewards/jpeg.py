"""JPEG compressibility and incompressibility (DDPO, Sec. 6.1): the file size in kB of the
image saved as JPEG at quality 95 (the `quality` param)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def jpeg_size_kb(image: np.ndarray, quality: int = 95) -> float:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000


def jpeg_compressibility(images, prompts, metadata, quality: int = 95):
    """r = -size_kB: smaller files are better."""
    sizes = np.array([jpeg_size_kb(image, quality) for image in images], dtype=np.float32)
    return -sizes, {"jpeg_kb": sizes.tolist()}


def jpeg_incompressibility(images, prompts, metadata, quality: int = 95):
    """r = +size_kB: larger files are better."""
    sizes = np.array([jpeg_size_kb(image, quality) for image in images], dtype=np.float32)
    return sizes, {"jpeg_kb": sizes.tolist()}
