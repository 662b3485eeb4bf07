"""Start images decoded in worker processes: the same pixels as in-process, clean errors, and a worker
that dies fails only the image it held."""

from __future__ import annotations

import asyncio
import io
import os
import signal

import numpy as np
import pytest
from PIL import Image

from streamgen.server.image_decode import ImageDecoder, ImageError, decode


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_workers_decode_as_in_process_and_survive_a_dead_worker() -> None:
    rng = np.random.default_rng(0)
    png = _png(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8))
    decoder = ImageDecoder(1)
    try:
        assert decoder.start() is True

        async def scenario() -> None:
            got = await decoder.decode(png, 32, 32, 10**6)
            assert got.dtype == np.uint8 and np.array_equal(got, decode(png, 32, 32, 10**6))
            with pytest.raises(ImageError, match="not a decodable PNG or JPEG"):
                await decoder.decode(b"\x89PNG\r\n\x1a\n" + b"\0" * 40, 32, 32, 10**6)
            with pytest.raises(ImageError, match="the limit is 100 pixels"):
                await decoder.decode(png, 32, 32, 100)
            for pid in list(decoder._pool._processes):  # noqa: SLF001 - kill the worker, as an OOM kill would
                os.kill(pid, signal.SIGKILL)
            with pytest.raises(RuntimeError, match="decoder process died"):
                for _ in range(20):  # the pool notices the death on its next use
                    await decoder.decode(png, 32, 32, 10**6)
                    await asyncio.sleep(0.05)
            again = await decoder.decode(png, 32, 32, 10**6)  # a rebuilt pool
            assert np.array_equal(again, got)

        asyncio.run(scenario())
    finally:
        decoder.close()
    with pytest.raises(ValueError, match="workers must be >= 1"):
        ImageDecoder(0)
