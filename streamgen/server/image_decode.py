"""Start images: PNG/JPEG bytes -> the model's frame size, in a process of their own.

Decoding a large photo holds the GIL for long stretches (Pillow allocates and sets up the decoded
image with every other Python thread waiting: ~20-100 ms per 20-Mpx image on a busy machine), so
the server runs :func:`decode` in worker processes (:class:`ImageDecoder`), never in its own
threads: health checks and other streams' chunks do not wait for an upload. This module imports
only Pillow and numpy, so a worker starts in a fraction of a second.

The fitting: PNG or JPEG only; EXIF orientation applied; transparency composited over white; then
centre-cropped to the model's aspect ratio and resized (Lanczos) to its exact size.
"""

from __future__ import annotations

import asyncio
import gc
import io
import multiprocessing
import re
from concurrent.futures import CancelledError, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
from PIL import ExifTags, Image, ImageOps

_OBJECT_REPR = re.compile(r"<[^<>]*? at 0x[0-9a-fA-F]+>")


class ImageError(ValueError):
    """The bytes are not an image we take (the message is for the client)."""


def clean_message(message: str) -> str:
    """A client-facing message without object reprs or memory addresses (``<_io.BytesIO object at 0x..>``)."""
    return _OBJECT_REPR.sub("<object>", message)


def decode(data: bytes, width: int, height: int, max_pixels: int) -> np.ndarray:
    """PNG/JPEG bytes -> ``np.uint8 [height, width, 3]``; :class:`ImageError` for anything else.

    The pixel budget is checked on the header (``Image.open`` reads nothing else), before any pixel
    is decoded, so a small file that declares a huge image (a decompression bomb) costs nothing.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in ("PNG", "JPEG"):
                raise ImageError(f"start_image must be PNG or JPEG, got {img.format or 'an unknown format'}")
            if img.width * img.height > max_pixels:
                raise ImageError(f"start_image is {img.width}x{img.height}; the limit is {max_pixels} pixels")
            if img.format == "JPEG":
                # Let libjpeg decode at a reduced DCT scale when the photo is much larger than needed:
                # still >= 2x the output on both sides (any EXIF rotation included), then Lanczos.
                side = 2 * max(width, height)
                img.draft("RGB", (side, side))
            img.load()  # decode now: a truncated or corrupt file fails here, not later
            if img.getexif().get(ExifTags.Base.Orientation, 1) != 1:
                img = ImageOps.exif_transpose(img)  # (a copy: only when there is something to rotate)
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, rgba)
            rgb = img if img.mode == "RGB" else img.convert("RGB")
            fitted = rgb.resize((width, height), Image.Resampling.LANCZOS, box=_centre_crop(rgb.size, width, height),
                                reducing_gap=3.0)
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageError("start_image is not a decodable PNG or JPEG: unrecognised image data") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageError(f"start_image is not a decodable PNG or JPEG: {clean_message(str(exc))}") from None
    return np.asarray(fitted, dtype=np.uint8).copy()  # [H, W, 3]


def _centre_crop(size: tuple[int, int], width: int, height: int) -> tuple[float, float, float, float]:
    """The largest centred box of ``size`` with the aspect ratio ``width:height`` (as ``ImageOps.fit``)."""
    w, h = size
    if w * height > h * width:  # wider than the target: trim the sides
        crop_w = h * width / height
        return ((w - crop_w) / 2, 0.0, (w + crop_w) / 2, float(h))
    crop_h = w * height / width
    return (0.0, (h - crop_h) / 2, float(w), (h + crop_h) / 2)


def _ready() -> bool:
    return True


class ImageDecoder:
    """A bounded pool of decoding processes (spawned: the server's threads and torch state are not
    forked). :meth:`start` warms every worker, so the first upload does not pay for process start;
    a worker that dies (killed, out of memory) fails only the image it held and the pool is rebuilt."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"))

    def start(self) -> bool:
        """Start every worker now (blocking; call it off the event loop). False if the pool was closed
        or broke meanwhile: :meth:`decode` then starts (or rebuilds) workers as it needs them."""
        try:
            for future in [self._pool.submit(_ready) for _ in range(self.workers)]:
                future.result(timeout=60)
        except (BrokenProcessPool, RuntimeError, CancelledError, TimeoutError):
            return False
        return True

    async def decode(self, data: bytes, width: int, height: int, max_pixels: int) -> np.ndarray:
        """:func:`decode` in a worker process; :class:`ImageError` for a bad image, RuntimeError if the
        worker died."""
        pool = self._pool
        try:
            return await asyncio.wrap_future(pool.submit(decode, data, width, height, max_pixels))
        except BrokenProcessPool:
            if self._pool is pool:  # one rebuild per breakage, whoever sees it first
                self._pool = self._new_pool()
                pool.shutdown(wait=False, cancel_futures=True)
            raise RuntimeError("the image decoder process died while decoding the start image") from None

    def close(self) -> None:
        """Stop the workers (a decode in progress is abandoned) and release the pool's queues now, so
        a process that ends with ``os._exit`` leaves no semaphore for the resource tracker to reap."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        gc.collect()  # the pool's queues and their semaphores are unlinked as they are collected
