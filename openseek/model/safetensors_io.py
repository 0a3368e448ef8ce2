"""Reading safetensors checkpoints: the tensor name -> file map of a folder (sharded or not, the index's shard
names confined to the folder) and a positioned-read shard reader that reads whole tensors or a rank's part of one.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open


def checkpoint_files(path: Path) -> dict[str, Path]:
    """tensor name -> file, from model.safetensors.index.json or the folder's *.safetensors files."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = _weight_map(index)
        for f in sorted(set(weight_map.values())):
            if not (path / f).is_file():
                raise FileNotFoundError(f"shard {f} listed in {index} is missing")
        return {name: path / f for name, f in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")
    out = {}
    for f in files:
        with _open(f) as st:
            out.update({name: f for name in st.keys()})
    return out


def _weight_map(index: Path) -> dict[str, str]:
    """The index's tensor name -> shard file name, every shard inside the folder.

    A shard name is confined lexically (relative, no `..`), not by resolving it: the Hugging Face cache's
    snapshot folders are symlinks into its blobs folder, and a symlink is the folder owner's choice, while
    the index is downloaded data that once named `../../etc/passwd`."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index} is not a valid safetensors index (a JSON object with a weight_map): "
                         f"{type(e).__name__}: {e}") from None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: weight_map must be an object of tensor name -> shard file, "
                         f"not {type(weight_map).__name__}")
    for name, f in weight_map.items():
        if not isinstance(f, str):
            raise ValueError(f"{index}: weight_map[{name!r}]={f!r} must be a shard file name (a string)")
        if not f or Path(f).is_absolute() or ".." in Path(f).parts:
            raise ValueError(f"{index}: weight_map[{name!r}]={f!r} is not a file inside the model folder")
    return weight_map


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
                      "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class _Shard:
    """Reads a safetensors file's tensors with pread, not mmap: a mapped page read once counts as resident until
    the file is closed, so loading a 30 GB file would show 30 GB resident however little of it the model keeps.
    Its header was validated by safe_open in _check."""

    def __init__(self, file: Path):
        self.file, self.fd = file, os.open(file, os.O_RDONLY)
        (n,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
        self.header, self.base = json.loads(os.pread(self.fd, n, 8)), 8 + n

    def get_tensor(self, name: str, part: tuple[int, int, int] | None = None) -> torch.Tensor:
        """The tensor, or only its part (dim, start, stop) of a 2-D one: a tensor-parallel rank reads its slice."""
        meta = self.header[name]
        start, end = meta["data_offsets"]
        dtype, shape = SAFETENSORS_DTYPES[meta["dtype"]], list(meta["shape"])
        if part is None:
            spans = [(start, end - start)]
        else:
            dim, a, b = part
            assert len(shape) == 2 and dim in (0, 1), f"{name}: only 2-D tensors are read in parts"
            row, item = shape[1] * dtype.itemsize, dtype.itemsize
            spans = [(start + a * row, (b - a) * row)] if dim == 0 else \
                [(start + i * row + a * item, (b - a) * item) for i in range(shape[0])]  # a column band, row by row
            shape[dim] = b - a
        buf = bytearray(sum(n for _, n in spans))
        view, at = memoryview(buf), 0
        for offset, n in spans:
            self._read(name, view[at:at + n], offset)
            at += n
        return (torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)).view(shape)

    def _read(self, name: str, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):  # one read returns at most ~2 GiB
            got = os.preadv(self.fd, [view[done:]], self.base + offset + done)
            if got == 0:
                raise ValueError(f"{self.file}: {name} is cut short (file truncated?)")
            done += got

    def close(self) -> None:
        os.close(self.fd)


def _open(file: Path):
    try:
        return safe_open(file, framework="pt")
    except Exception as e:  # safetensors raises its own error type for truncated or corrupt files
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
