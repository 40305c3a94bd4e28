"""A safetensors checkpoint (one file or sharded with an index) read tensor by tensor into memory we own.

Tensors are read with ``os.pread`` straight into their destination (or into one staging buffer when
the dtype changes or the destination is a GPU), never through a memory map: a map keeps every page
it has touched resident in this process until the file is closed, so a full load through a map peaks
at the final footprint plus the whole file. Reading into the destination keeps host memory at the
final footprint plus one tensor. Headers and shards are found by the profile's own reader
(``vramancer.models.checkpoint``), which gives each tensor's file offset.
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import MalformedCheckpointError, UnknownModelError
from ..models.checkpoint import (
    SAFETENSORS_TORCH_NAMES,
    HeaderTensor,
    checkpoint_files,
    read_safetensors_header,
    refuse_pickle_only,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["TensorInfo", "Checkpoint", "SAFETENSORS_DTYPES", "torch_dtype_of", "write_safetensors"]

# safetensors dtype names -> torch dtype attribute names (models/checkpoint.py holds the table)
SAFETENSORS_DTYPES = SAFETENSORS_TORCH_NAMES


def torch_dtype_of(safetensors_dtype: str) -> torch.dtype:
    import torch

    name = SAFETENSORS_DTYPES.get(safetensors_dtype)
    if name is None or not hasattr(torch, name):
        raise MalformedCheckpointError(f"unsupported safetensors dtype {safetensors_dtype!r}")
    return getattr(torch, name)


# where one tensor lies in its file (name, shape, dtype, nbytes, file, offset_bytes)
TensorInfo = HeaderTensor


class Checkpoint:
    """The tensors of a checkpoint folder (``model.safetensors`` or ``model.safetensors.index.json`` +
    shards) or of one ``.safetensors`` file. Holds one open file descriptor per shard; ``close()``."""

    def __init__(self, path: str | os.PathLike):
        root = Path(path)
        self.path = root
        if root.is_file():
            files = [root]
        elif root.is_dir():
            files, missing = checkpoint_files(root)
            if missing:
                raise MalformedCheckpointError(f"{root}: {missing[0]}")
            if not files:
                refuse_pickle_only(root)
                raise UnknownModelError(f"{root}: no .safetensors weights found")
        else:
            raise UnknownModelError(f"{root}: no such file or folder")
        self.tensors: dict[str, TensorInfo] = {}
        for f in files:
            self.tensors.update((t.name, t) for t in read_safetensors_header(f)[0])
        self._fds: dict[str, int] = {}

    # -- lookup -------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    @property
    def largest_tensor_bytes(self) -> int:
        return max((t.nbytes for t in self.tensors.values()), default=0)

    # -- reading ------------------------------------------------------------------------------
    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            self._fds[path] = fd
        return fd

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Read tensor ``name`` into ``out``: a contiguous CPU tensor of the stored dtype and at least
        the stored byte size (extra bytes are left alone). Returns the view holding the tensor."""
        import torch

        info = self.tensors[name]
        if out.device.type != "cpu" or not out.is_contiguous():
            raise ValueError("read_into needs a contiguous CPU tensor")
        raw = out.view(-1).view(torch.uint8) if out.dtype != torch.uint8 else out.view(-1)
        if raw.numel() < info.nbytes:
            raise ValueError(f"buffer of {raw.numel()} bytes is too small for {name} ({info.nbytes} bytes)")
        view = memoryview(raw.numpy())[: info.nbytes]
        fd = self._fd(info.file)
        done = 0
        while done < info.nbytes:
            n = os.preadv(fd, [view[done:]], info.offset_bytes + done)
            if n <= 0:
                raise MalformedCheckpointError(f"{info.file}: unexpected end of file reading {name}")
            done += n
        return raw[: info.nbytes].view(torch_dtype_of(info.dtype)).view(info.shape)

    def read(self, name: str, pin_memory: bool = False) -> torch.Tensor:
        """A new CPU tensor holding ``name`` in its stored dtype."""
        import torch

        info = self.tensors[name]
        out = torch.empty(info.nbytes, dtype=torch.uint8, pin_memory=pin_memory)
        return self.read_into(name, out)

    def close(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


_TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def write_safetensors(path: str | os.PathLike, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                      tensors: Iterable[torch.Tensor]) -> Checkpoint:
    """Write a safetensors file one tensor at a time: the header from ``specs`` (name, dtype, shape)
    first, then each tensor of ``tensors`` (same order) as it comes, so no more than one tensor is in
    memory. Returns the written file opened as a Checkpoint."""
    import torch

    header: dict[str, dict] = {}
    offset = 0
    sizes: list[int] = []
    for name, dtype, shape in specs:
        n = 1
        for s in shape:
            n *= int(s)
        nbytes = n * torch.empty((), dtype=dtype).element_size()
        st_name = _TORCH_TO_SAFETENSORS.get(str(dtype).replace("torch.", ""))
        if st_name is None:
            raise ValueError(f"cannot store dtype {dtype} in safetensors")
        header[name] = {"dtype": st_name, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        sizes.append(nbytes)
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        count = 0
        for (name, dtype, shape), nbytes, t in zip(specs, sizes, tensors):
            t = t.detach().to("cpu", dtype).contiguous()
            if tuple(t.shape) != tuple(shape) or t.numel() * t.element_size() != nbytes:
                raise ValueError(f"{name}: shape {tuple(t.shape)} does not match {tuple(shape)}")
            f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
            count += 1
        if count != len(specs):
            raise ValueError(f"wrote {count} of {len(specs)} tensors")
    return Checkpoint(path)
