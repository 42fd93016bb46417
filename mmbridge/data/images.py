"""Image loading and preprocessing (PIL + numpy only, no torchvision)."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_MAX_PIXELS",
    "DATA_FORMATS",
    "IMAGE_FORMATS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SIGLIP_MEAN",
    "SIGLIP_STD",
    "ImageError",
    "ImageTooLarge",
    "decode_image",
    "load_image",
    "preprocess",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
SIGLIP_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)

#: Images with more pixels than this are rejected as possible decompression bombs.
DEFAULT_MAX_PIXELS: int = 64_000_000

#: The formats a server request may send: PIL would otherwise try every plugin it has, some of which run other
#: programs (EPS runs Ghostscript where it is installed) or parse rarely used, rarely audited layouts.
IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
#: The formats training and evaluation data may hold (the user's own files): those, and the ones datasets in
#: science and remote sensing use, each decoded by PIL itself (no other program).
DATA_FORMATS: tuple[str, ...] = IMAGE_FORMATS + ("TIFF", "PPM", "TGA", "JPEG2000")


class ImageError(ValueError):
    """An image file could not be loaded; the message names the path and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"cannot load image {self.path!r}: {reason}")


class ImageTooLarge(ImageError):
    """The image's header declares more pixels than allowed; nothing was decoded."""


def load_image(
    path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS, formats: tuple[str, ...] = DATA_FORMATS
) -> Image.Image:
    """Load ``path`` fully into memory as an RGB image.

    Raises ``ImageError`` for a missing or empty file, a file that is not one of ``formats`` or that PIL
    cannot decode (including truncated data), and ``ImageTooLarge`` for images larger than ``max_pixels`` pixels
    or PIL's ``Image.MAX_IMAGE_PIXELS``, whichever is smaller (``None``: PIL's alone), read from the header
    before any pixel data is decoded.
    """
    if not os.path.exists(path):
        raise ImageError(path, "file does not exist")
    if not os.path.isfile(path):
        raise ImageError(path, "not a regular file")
    if os.path.getsize(path) == 0:
        raise ImageError(path, "file is empty (0 bytes)")
    return _decode(path, path, max_pixels, formats)


def decode_image(
    data: bytes,
    name: str = "<bytes>",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    formats: tuple[str, ...] = DATA_FORMATS,
) -> Image.Image:
    """`load_image` for an image held in memory (e.g. a base64 data URL); errors name it `name`."""
    if not data:
        raise ImageError(name, "no image data (0 bytes)")
    return _decode(io.BytesIO(data), name, max_pixels, formats)


def _decode(source, name, max_pixels: int | None, formats: tuple[str, ...]) -> Image.Image:
    """Open `source` (a path or a binary file), check its size, decode it fully, as RGB.

    PIL's own bomb check only warns below twice its `MAX_IMAGE_PIXELS`; rather than turning that warning into
    an error with `warnings.catch_warnings` (which swaps the process-wide filters, so threads decoding at the
    same time undo each other's), the size is compared here with the smaller of the two limits."""
    limits = [n for n in (max_pixels, Image.MAX_IMAGE_PIXELS) if n is not None]
    try:
        with Image.open(source, formats=formats) as img:
            w, h = img.size  # header only; check before decoding pixel data
            if limits and w * h > min(limits):
                raise ImageTooLarge(
                    name, f"{w}x{h} = {w * h} pixels exceeds the limit of {min(limits)} (possible decompression bomb)"
                )
            img.load()  # decode now so truncation/corruption is detected here
            return img.convert("RGB")
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(name, f"decompression bomb: {e}") from e
    except Image.UnidentifiedImageError as e:
        raise ImageError(name, f"not a recognised image format (one of {', '.join(formats)})") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # PIL reports truncated/corrupt data as OSError, SyntaxError ("broken PNG") or EOFError.
        raise ImageError(name, f"corrupt or truncated image data ({type(e).__name__}: {e})") from e


def preprocess(
    images: Sequence[Image.Image],
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """Resize to ``size``x``size`` (PIL bicubic), scale to [0, 1] and normalise.

    Returns a float32 tensor ``[B, 3, size, size]``.
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values each, got {mean!r} and {std!r}")
    if len(images) == 0:
        return torch.empty(0, 3, size, size, dtype=torch.float32)
    arrays = []
    for img in images:
        if img.mode != "RGB":
            img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(img, dtype=np.uint8))
    batch = np.stack(arrays).astype(np.float32)  # [B, H, W, 3]
    mean_a = np.asarray(mean, dtype=np.float32)
    std_a = np.asarray(std, dtype=np.float32)
    batch = (batch / np.float32(255.0) - mean_a) / std_a
    return torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))
