"""A fast PNG writer for panels (about 2x Pillow's fastest setting and 10x its default, which W&B uses).

Panels are mostly flat colour and nearest-neighbour enlargements, which deflate compresses well without PNG's
per-row filters; Pillow tries every filter on every row. Files decode with any PNG reader.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
COMPRESS_LEVEL = 1  # level 6 saves ~3% of the bytes for twice the time on panels


def encode_png(image: np.ndarray) -> bytes:
    """``uint8 [H, W, 3]`` RGB to PNG bytes (8-bit truecolour, no filter, deflate level 1).

    Example:
        >>> import io, numpy as np
        >>> from PIL import Image
        >>> picture = np.arange(24, dtype=np.uint8).reshape(2, 4, 3)
        >>> bool((np.asarray(Image.open(io.BytesIO(encode_png(picture)))) == picture).all())
        True
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image: expected uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
    height, width, _ = image.shape
    rows = np.zeros((height, 1 + 3 * width), dtype=np.uint8)  # each row starts with filter type 0 (none)
    rows[:, 1:] = image.reshape(height, 3 * width)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, truecolour, no interlace
    body = zlib.compress(rows.tobytes(), COMPRESS_LEVEL)  # releases the GIL
    return SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
