"""Block-quantised tensors out of a GGUF file, found by walking its header (gguf's GGUFReader takes ~5 s here:
it turns every metadata value, the tokenizer's 49,152 tokens and merges included, into numpy fields).

Layout (GGUF v2/v3, little-endian): magic, version, tensor count, metadata count; the metadata
(key, type, value); the tensor infos (name, dims, type, offset into the data); padding to
`general.alignment` (32 by default); the data.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

import numpy as np

from kernels.gguf_linear import BLOCK, BLOCK_BYTES

# sizes of the fixed-width metadata types, by type code; 8 is a string, 9 an array
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4


class _Cursor:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.at = buf, 0

    def take(self, fmt: str) -> int:
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.at)
        self.at += struct.calcsize(fmt)
        return int(value)

    def string(self) -> bytes:
        length = self.take("Q")
        self.at += length
        return self.buf[self.at - length : self.at]

    def skip_value(self, kind: int) -> None:
        if kind in _SCALAR:
            self.at += _SCALAR[kind]
        elif kind == _STRING:
            self.string()
        elif kind == _ARRAY:
            item, count = self.take("I"), self.take("Q")
            if item in _SCALAR:
                self.at += _SCALAR[item] * count
            else:
                for _ in range(count):
                    self.skip_value(item)
        else:
            raise ValueError(f"GGUF: unknown metadata type {kind}")


def _tensor_infos(buf: mmap.mmap, path: Path) -> tuple[dict[bytes, tuple[int, list[int], int]], int]:
    """{name: (ggml type, dims as stored, offset)} of every tensor, and where the data starts."""
    cur = _Cursor(buf)
    cur.at = 4
    if buf[:4] != b"GGUF" or cur.take("I") not in (2, 3):
        raise ValueError(f"GGUF: {path} is not a GGUF v2/v3 file")
    tensors, entries = cur.take("Q"), cur.take("Q")
    alignment = 32
    for _ in range(entries):
        key, kind = cur.string(), cur.take("I")
        if key == b"general.alignment" and kind == _UINT32:
            alignment = cur.take("I")
        else:
            cur.skip_value(kind)
    infos = {}
    for _ in range(tensors):
        name = cur.string()
        dims = [cur.take("Q") for _ in range(cur.take("I"))]
        infos[name] = (cur.take("I"), dims, cur.take("Q"))
    return infos, -(-cur.at // alignment) * alignment


def _copy_blocks(buf: mmap.mmap, start: int, kind: int, dims: list[int]) -> np.ndarray:
    columns, rows = dims[0], int(np.prod(dims[1:]))  # ggml lists the fastest-moving dimension first
    row_bytes = columns // BLOCK * BLOCK_BYTES[kind]
    data = np.frombuffer(buf, dtype=np.uint8, count=rows * row_bytes, offset=start).reshape(rows, row_bytes)
    copy = data.copy()  # the map closes when the caller is done
    del data
    return copy


def read_blocks(path: Path, name: str) -> tuple[int, np.ndarray] | None:
    """(ggml type, a copy of its blocks as uint8 [rows, row bytes]) of tensor `name`, or None when the
    file has no such tensor or it is not of a block type the kernels read (Q4_1, Q8_0)."""
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        infos, data_start = _tensor_infos(buf, path)
        found = infos.get(name.encode())
        if found is None or found[0] not in BLOCK_BYTES:
            return None
        kind, dims, offset = found
        return kind, _copy_blocks(buf, data_start + offset, kind, dims)


def all_blocks(path: Path) -> list[tuple[str, int, np.ndarray]]:
    """(name, ggml type, a copy of its blocks) of every block-quantised tensor, in the file's order."""
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        infos, data_start = _tensor_infos(buf, path)
        return [
            (name.decode(), kind, _copy_blocks(buf, data_start + offset, kind, dims))
            for name, (kind, dims, offset) in infos.items()
            if kind in BLOCK_BYTES
        ]
