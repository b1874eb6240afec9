"""A machine-readable timestamp drawn into a video frame's top-left corner.

The latency probe stamps each frame it publishes with the time it was made and reads the
stamp back from the output stream. Big black/white cells survive H.264 at low bitrates and
the swap (which touches faces only); 8 check bits reject frames where the cells are
damaged, so a bad read never becomes a bogus latency figure.
"""

from __future__ import annotations

import numpy as np

VALUE_BITS = 32
CHECK_BITS = 8
CELLS = VALUE_BITS + CHECK_BITS
COLUMNS = 20  # two rows of 20 cells


def _cell_size(width: int) -> int:
    return max(6, width // 80)


def _checksum(value: int) -> int:
    return (value ^ (value >> 8) ^ (value >> 16) ^ (value >> 24) ^ 0x5A) & 0xFF


def _bits(value: int) -> np.ndarray:
    word = (value & 0xFFFFFFFF) | (_checksum(value & 0xFFFFFFFF) << VALUE_BITS)
    return np.array([(word >> i) & 1 for i in range(CELLS)], dtype=np.uint8)


def draw_timestamp(image: np.ndarray, value: int) -> np.ndarray:
    """Stamp ``value`` (0..2^32-1, e.g. milliseconds) into ``image`` in place."""
    cell = _cell_size(image.shape[1])
    rows = CELLS // COLUMNS
    image[: rows * cell + 2 * cell, : COLUMNS * cell + 2 * cell] = 128  # a quiet border
    for i, bit in enumerate(_bits(value)):
        r, c = divmod(i, COLUMNS)
        y, x = cell + r * cell, cell + c * cell
        image[y : y + cell, x : x + cell] = 255 if bit else 0
    return image


def read_timestamp(image: np.ndarray) -> int | None:
    """The stamped value, or None when there is no valid stamp."""
    cell = _cell_size(image.shape[1])
    gray = image.mean(axis=2) if image.ndim == 3 else image
    bits = []
    for i in range(CELLS):
        r, c = divmod(i, COLUMNS)
        y, x = cell + r * cell + cell // 2, cell + c * cell + cell // 2
        patch = gray[y - cell // 4 : y + cell // 4 + 1, x - cell // 4 : x + cell // 4 + 1]
        level = float(patch.mean())
        if 80 < level < 176:  # neither black nor white: not a stamp
            return None
        bits.append(1 if level >= 128 else 0)
    word = sum(bit << i for i, bit in enumerate(bits))
    value, check = word & 0xFFFFFFFF, word >> VALUE_BITS
    return value if check == _checksum(value) else None
