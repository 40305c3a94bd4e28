"""The cloud bridge: a node that holds a checkpoint serves named tensors over any Link connection;
a worker asks for exactly its tensors and receives them chunk by chunk, hash-verified, straight into
their destination buffers, cached by content hash and resumable (docs/link-protocol.md, "Cloud bridge").

    # the node with the weights (one thread or process per connection)
    server = BridgeServer(checkpoint_tensors)            # HeaderTensor-like entries (hub/bridge.py
    server.serve(listener.accept())                      #   builds them from a safetensors folder)

    # the worker
    tensors = fetch_tensors(lambda: tls.connect(addr), names, cache_dir="~/.cache/vrm", device="cuda:0")

Messages are ordinary Link TENSORS frames on stream ``BRIDGE_STREAM``: tensor 0 is a uint8 vector
holding one small JSON object (the message; at most ``BridgeLimits.max_message_bytes``), tensor 1,
when present, a uint8 vector of raw bytes (digests or one chunk). Nothing is unpickled. Each tensor
is cut into ``chunk_bytes`` chunks; a chunk's digest is SHA-256 of its bytes, and a tensor's content
id is SHA-256 over ``b"VRMB1" | chunk bytes u64 | byte length u64 | the chunk digests``: it names the
cache entry and verifies the whole tensor (every chunk matches a digest that the id covers).

The receive path: each chunk is read with ``recv_into`` into the destination's own bytes (CPU
tensors, pinned or not), or into one chunk-sized pinned staging buffer that is copied to the device
(GPU destinations), then hashed. A chunk that fails its digest is requested again (``chunk_retries``
times) and then the transfer fails with one ``BridgeError`` line. A dropped connection is dialed
again (``reconnects`` times, when a dial function is given) and only unverified chunks are asked for;
with ``cache_dir`` a partial file and its verified-chunk list survive the process too. Tensors of one
fetch with the same content id (e.g. norm weights still all ones) cross the network once and are
copied on the worker.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import FrameError, LinkError
from .frame import FrameType, TensorDesc
from .transport import Connection

__all__ = [
    "BRIDGE_STREAM",
    "CHUNK_BYTES",
    "DIGEST_BYTES",
    "BridgeError",
    "BridgeLimits",
    "BridgeTensor",
    "BridgeServer",
    "ServeStats",
    "FetchStats",
    "fetch_tensors",
    "content_id",
]

log = logging.getLogger("vramancer.link")

BRIDGE_STREAM = 0x42524447      # b"BRDG" read as a little-endian u32 on the wire
CHUNK_BYTES = 4 << 20
DIGEST_BYTES = 32               # SHA-256
_ID_PREFIX = b"VRMB1"
_PROGRESS_EVERY_S = 0.5

# safetensors dtype names -> (torch dtype attribute, itemsize); the bridge moves bytes, torch types them
_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "U16": ("uint16", 2), "U32": ("uint32", 4), "U64": ("uint64", 8),
}


class BridgeError(LinkError):
    """A bridge transfer refused or failed: an unknown tensor, a malformed or oversized message,
    a chunk that keeps failing its digest, a destination of the wrong shape. One line."""


@dataclass(frozen=True)
class BridgeLimits:
    """What either side accepts before allocating anything."""

    max_message_bytes: int = 1 << 20        # one JSON message
    max_names: int = 100_000                # tensors in one index request
    max_name_chars: int = 1024
    max_tensor_bytes: int = 1 << 40         # one tensor
    max_total_bytes: int = 1 << 42          # one fetch
    max_ndim: int = 8
    max_digest_bytes: int = 64 << 20        # the index reply's chunk digests (2 M chunks)
    min_chunk_bytes: int = 4 << 10
    max_chunk_bytes: int = 256 << 20


@dataclass(frozen=True)
class BridgeTensor:
    """One tensor a server offers: where its bytes lie (``file`` at ``offset_bytes``) and what they are.
    ``vramancer.models.checkpoint.HeaderTensor`` has these fields, so checkpoint headers serve as is."""

    name: str
    shape: tuple[int, ...]
    dtype: str                # safetensors dtype name ("BF16")
    nbytes: int
    file: str
    offset_bytes: int


@dataclass
class ServeStats:
    requests: int = 0
    chunks_sent: int = 0
    chunk_bytes_sent: int = 0
    errors: int = 0


@dataclass
class FetchStats:
    """What one ``fetch_tensors`` call moved (filled in as it goes)."""

    chunk_bytes_from_network: int = 0       # verified chunk bytes received
    chunk_bytes_from_cache: int = 0
    chunks_from_network: int = 0
    chunks_from_cache: int = 0
    chunks_refetched: int = 0               # failed their digest and were asked for again
    chunks_deduplicated: int = 0            # of tensors whose bytes equal another's in this fetch (copied)
    reconnects: int = 0
    requested_chunks: list[tuple[str, int]] = field(default_factory=list)   # (tensor, chunk) asked for


def content_id(chunk_bytes: int, nbytes: int, digests: bytes) -> str:
    """The content id (hex) of a tensor from its chunk size, byte length and chunk digests."""
    return hashlib.sha256(_ID_PREFIX + struct.pack("<QQ", chunk_bytes, nbytes) + digests).hexdigest()


def _n_chunks(nbytes: int, chunk_bytes: int) -> int:
    return max(1, math.ceil(nbytes / chunk_bytes)) if nbytes else 0


def _span(index: int, nbytes: int, chunk_bytes: int) -> tuple[int, int]:
    lo = index * chunk_bytes
    return lo, min(nbytes, lo + chunk_bytes)


# ---------------------------------------------------------------------------------------------- wire
def _send(conn: Connection, message: dict, data: Any = None) -> None:
    import numpy as np

    blob = np.frombuffer(json.dumps(message, separators=(",", ":")).encode(), dtype=np.uint8)
    conn.send([blob] if data is None else [blob, data], stream_id=BRIDGE_STREAM)


class _Expect:
    """A buffer factory for one bridge message: tensor 0, the JSON message, at most ``max_message``
    bytes; tensor 1, when ``data`` is given, exactly ``data``'s bytes (else none allowed). Refuses
    (FrameError, nothing allocated) any other layout."""

    def __init__(self, max_message: int, data: memoryview | None = None, data_bytes_max: int = 0) -> None:
        self.max_message = max_message
        self.data = data
        self.data_bytes_max = data_bytes_max
        self.i = 0

    def __call__(self, desc: TensorDesc) -> tuple[Any, memoryview]:
        i, self.i = self.i, self.i + 1
        if desc.dtype.name != "uint8" or len(desc.shape) != 1:
            raise FrameError(f"bridge message tensor {i} is {desc.dtype.name} {list(desc.shape)}, not a uint8 vector")
        if i == 0:
            if desc.byte_length > self.max_message:
                raise FrameError(f"bridge message of {desc.byte_length} bytes, limit {self.max_message}")
            buf = bytearray(desc.byte_length)
            return buf, memoryview(buf)
        if i == 1 and self.data is not None:
            if desc.byte_length != self.data.nbytes:
                raise FrameError(f"bridge data of {desc.byte_length} bytes, expected {self.data.nbytes}")
            return self.data, self.data
        if i == 1 and self.data_bytes_max:
            if desc.byte_length > self.data_bytes_max:
                raise FrameError(f"bridge data of {desc.byte_length} bytes, limit {self.data_bytes_max}")
            buf = bytearray(desc.byte_length)
            return buf, memoryview(buf)
        raise FrameError(f"bridge message with an unexpected tensor {i}")


def _recv(conn: Connection, expect: _Expect) -> tuple[dict, Any]:
    frame = conn.recv(factory=expect)
    if frame.frame_type == FrameType.CLOSE:
        return {"op": "bye"}, None
    if frame.stream_id != BRIDGE_STREAM:
        raise _broken(conn, f"frame on stream {frame.stream_id}, not the bridge's")
    if not frame.tensors:
        raise _broken(conn, "bridge frame without a message")
    try:
        message = json.loads(bytes(frame.tensors[0]))
    except (UnicodeDecodeError, ValueError):
        raise _broken(conn, "bridge message is not JSON") from None
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise _broken(conn, "bridge message is not an object with an op")
    return message, frame.tensors[1] if len(frame.tensors) > 1 else None


def _broken(conn: Connection, reason: str) -> BridgeError:
    log.warning("link bridge: closing connection: %s", reason)
    conn.close()
    return BridgeError(f"bridge: {reason}")


# ---------------------------------------------------------------------------------------------- server
class BridgeServer:
    """Serves ``tensors`` (BridgeTensor or HeaderTensor-like entries) over Link connections; with
    ``names``, only those. Digests are computed the first time a tensor is asked for and kept.
    One server may serve several connections at once, one thread each (``stats`` adds them up)."""

    def __init__(self, tensors: Iterable[Any], names: Iterable[str] | None = None, *,
                 chunk_bytes: int = CHUNK_BYTES, limits: BridgeLimits | None = None) -> None:
        self.limits = limits or BridgeLimits()
        if not self.limits.min_chunk_bytes <= chunk_bytes <= self.limits.max_chunk_bytes:
            raise BridgeError(f"bridge chunk of {chunk_bytes} bytes outside "
                              f"{self.limits.min_chunk_bytes}..{self.limits.max_chunk_bytes}")
        self.chunk_bytes = chunk_bytes
        entries = {t.name: t for t in tensors}
        if names is not None:
            wanted = list(names)
            missing = [n for n in wanted if n not in entries]
            if missing:
                raise BridgeError(f"bridge: the checkpoint has no tensor {missing[0]!r}")
            entries = {n: entries[n] for n in wanted}
        for t in entries.values():
            if t.dtype not in _DTYPES:
                raise BridgeError(f"bridge: tensor {t.name!r} has dtype {t.dtype!r}, which the bridge does not carry")
        self.tensors: dict[str, Any] = entries
        self._digests: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self.stats = ServeStats()

    # -- content ---------------------------------------------------------------------------------
    def read_chunk(self, t: Any, lo: int, hi: int, buf: memoryview) -> memoryview:
        """Bytes [lo, hi) of tensor entry ``t`` read from its file into ``buf``."""
        out = buf[:hi - lo]
        with open(t.file, "rb", buffering=0) as f:
            got = 0
            while got < out.nbytes:
                n = os.preadv(f.fileno(), [out[got:]], t.offset_bytes + lo + got)
                if n <= 0:
                    raise BridgeError(f"bridge: {t.file} ends inside tensor {t.name!r}")
                got += n
        return out

    def digests(self, name: str) -> bytes:
        """The concatenated chunk digests of tensor ``name`` (read and hashed once)."""
        d = self._digests.get(name)
        if d is None:
            t = self.tensors[name]
            buf = memoryview(bytearray(min(self.chunk_bytes, max(t.nbytes, 1))))
            parts = []
            for i in range(_n_chunks(t.nbytes, self.chunk_bytes)):
                lo, hi = _span(i, t.nbytes, self.chunk_bytes)
                parts.append(hashlib.sha256(self.read_chunk(t, lo, hi, buf)).digest())
            with self._lock:
                d = self._digests.setdefault(name, b"".join(parts))
        return d

    def _count(self, **add: int) -> None:
        with self._lock:
            for k, v in add.items():
                setattr(self.stats, k, getattr(self.stats, k) + v)

    # -- protocol --------------------------------------------------------------------------------
    def serve(self, conn: Connection) -> ServeStats:
        """Answer ``conn``'s requests until it closes. A malformed or hostile request is answered
        with an error message, the connection closed, and BridgeError raised (nothing allocated past
        the limits); an unknown tensor name gets an error reply and the connection carries on."""
        import numpy as np

        buf = memoryview(bytearray(self.chunk_bytes))
        lim = self.limits
        try:
            while not conn.closed:
                message, _ = _recv(conn, _Expect(lim.max_message_bytes))
                self._count(requests=1)
                op = message["op"]
                if op == "index":
                    self._index(conn, message)
                elif op == "get":
                    name, ranges = self._check_get(conn, message)
                    t = self.tensors[name]
                    for a, b in ranges:
                        for i in range(a, b):
                            lo, hi = _span(i, t.nbytes, self.chunk_bytes)
                            data = np.frombuffer(self.read_chunk(t, lo, hi, buf), dtype=np.uint8)
                            _send(conn, {"op": "chunk", "name": name, "index": i}, data)
                            self._count(chunks_sent=1, chunk_bytes_sent=hi - lo)
                elif op == "bye":
                    break
                else:
                    self._refuse(conn, f"unknown op {op[:40]!r}")
        finally:
            conn.close()
        return self.stats

    def _refuse(self, conn: Connection, reason: str) -> None:
        self._count(errors=1)
        with contextlib.suppress(LinkError):
            _send(conn, {"op": "error", "message": reason, "fatal": True})
        raise _broken(conn, reason)

    def _index(self, conn: Connection, message: dict) -> None:
        import numpy as np

        lim = self.limits
        names = message.get("names")
        if names is None:
            names = list(self.tensors)
        if not isinstance(names, list) or len(names) > lim.max_names \
                or not all(isinstance(n, str) and len(n) <= lim.max_name_chars for n in names):
            self._refuse(conn, f"index request needs a list of at most {lim.max_names} tensor names")
        unknown = [n for n in names if n not in self.tensors]
        if unknown:
            self._count(errors=1)
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            _send(conn, {"op": "error", "message": f"no tensor {unknown[0][:200]!r} on this node{more}"})
            return
        entries, blobs = [], []
        for n in names:
            t = self.tensors[n]
            d = self.digests(n)
            blobs.append(d)
            entries.append({"name": n, "dtype": t.dtype, "shape": list(t.shape), "nbytes": t.nbytes,
                            "id": content_id(self.chunk_bytes, t.nbytes, d)})
        _send(conn, {"op": "index", "hash": "sha256", "chunk_bytes": self.chunk_bytes, "tensors": entries},
              np.frombuffer(b"".join(blobs), dtype=np.uint8))

    def _check_get(self, conn: Connection, message: dict) -> tuple[str, list[tuple[int, int]]]:
        name, ranges = message.get("name"), message.get("chunks")
        if not isinstance(name, str) or name not in self.tensors:
            self._refuse(conn, f"get of an unknown tensor {str(name)[:200]!r}")
        n = _n_chunks(self.tensors[name].nbytes, self.chunk_bytes)
        ok = isinstance(ranges, list) and len(ranges) <= n and all(
            isinstance(r, list) and len(r) == 2 and all(type(x) is int for x in r) and 0 <= r[0] < r[1] <= n
            for r in ranges)
        if not ok:
            self._refuse(conn, f"get {name[:200]!r}: chunk ranges must be [start, end) pairs within 0..{n}")
        if sum(b - a for a, b in ranges) > n:       # each chunk at most once: no amplification
            self._refuse(conn, f"get {name[:200]!r}: chunk ranges ask for more than the tensor's {n} chunks")
        return name, [(a, b) for a, b in ranges]


# ---------------------------------------------------------------------------------------------- client
@dataclass
class _Want:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    cid: str
    digests: bytes
    tensor: Any = None           # the destination (torch tensor)
    host: memoryview | None = None   # its bytes when it lives in host memory
    done: set[int] = field(default_factory=set)
    cache: _CacheEntry | None = None
    same_as: _Want | None = None     # an earlier tensor of this fetch with the same content id

    @property
    def n_chunks(self) -> int:
        return len(self.digests) // DIGEST_BYTES

    def digest(self, i: int) -> bytes:
        return self.digests[i * DIGEST_BYTES:(i + 1) * DIGEST_BYTES]


def _ranges(missing: Sequence[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for i in missing:
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def _parse_index(message: dict, data: Any, names: list[str], lim: BridgeLimits) -> tuple[int, list[_Want]]:
    if message.get("op") == "error":
        raise BridgeError(f"bridge: the server refused: {str(message.get('message'))[:300]}")
    chunk = message.get("chunk_bytes")
    entries = message.get("tensors")
    if message.get("op") != "index" or message.get("hash") != "sha256" or type(chunk) is not int \
            or not lim.min_chunk_bytes <= chunk <= lim.max_chunk_bytes or not isinstance(entries, list):
        raise BridgeError("bridge: malformed index reply")
    if [e.get("name") if isinstance(e, dict) else None for e in entries] != names:
        raise BridgeError("bridge: the index reply does not list exactly the tensors asked for")
    wants, total, pos = [], 0, 0
    raw = bytes(data) if data is not None else b""
    for e in entries:
        name, dtype, shape, nbytes, cid = e.get("name"), e.get("dtype"), e.get("shape"), e.get("nbytes"), e.get("id")
        if dtype not in _DTYPES or not isinstance(shape, list) or len(shape) > lim.max_ndim \
                or not all(type(d) is int and d >= 0 for d in shape) or type(nbytes) is not int \
                or not isinstance(cid, str) or len(cid) != 64:
            raise BridgeError(f"bridge: malformed index entry for {name!r}")
        if math.prod(shape) * _DTYPES[dtype][1] != nbytes:
            raise BridgeError(f"bridge: index entry {name!r}: {nbytes} bytes do not fit {dtype} {shape}")
        if nbytes > lim.max_tensor_bytes:
            raise BridgeError(f"bridge: tensor {name!r} of {nbytes} bytes over the limit of {lim.max_tensor_bytes}")
        total += nbytes
        if total > lim.max_total_bytes:
            raise BridgeError(f"bridge: the tensors asked for hold over {lim.max_total_bytes} bytes (the limit)")
        k = _n_chunks(nbytes, chunk) * DIGEST_BYTES
        digests = raw[pos:pos + k]
        pos += k
        if len(digests) != k or content_id(chunk, nbytes, digests) != cid:
            raise BridgeError(f"bridge: index entry {name!r}: its chunk digests do not match its content id")
        wants.append(_Want(name, dtype, tuple(shape), nbytes, cid, digests))
    if pos != len(raw):
        raise BridgeError("bridge: stray digest bytes in the index reply")
    return chunk, wants


def _host_bytes(t: Any) -> memoryview:
    import torch

    flat = t.reshape(-1).view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def _destination(w: _Want, given: Any, device: str, pin_memory: bool) -> None:
    import torch

    dtype = getattr(torch, _DTYPES[w.dtype][0])
    if given is None:
        pin = pin_memory and device == "cpu" and torch.cuda.is_available()
        given = torch.empty(w.shape, dtype=dtype, device=device, pin_memory=pin)
    elif not isinstance(given, torch.Tensor) or given.dtype != dtype or tuple(given.shape) != w.shape \
            or not given.is_contiguous():
        what = f"{given.dtype} {list(given.shape)}" if isinstance(given, torch.Tensor) else type(given).__name__
        raise BridgeError(f"bridge: destination of {w.name!r} is {what}, the tensor is {dtype} {list(w.shape)}")
    w.tensor = given
    w.host = _host_bytes(given) if given.device.type == "cpu" else None


class _CacheEntry:
    """``<id>.bin`` once complete; before that ``<id>.part`` with ``<id>.part.json`` listing the
    chunks verified so far (rewritten atomically). Cached chunks are verified again when read."""

    def __init__(self, root: Path, w: _Want, chunk_bytes: int) -> None:
        self.root, self.w, self.chunk_bytes = root, w, chunk_bytes
        self.final = root / f"{w.cid}.bin"
        self.part = root / f"{w.cid}.part"
        self.progress = root / f"{w.cid}.part.json"
        self.fd: int | None = None
        self.verified: set[int] = set()
        self._saved_at = 0.0

    def cached_chunks(self) -> tuple[Path | None, set[int]]:
        if self.final.is_file() and self.final.stat().st_size == self.w.nbytes:
            return self.final, set(range(self.w.n_chunks))
        if self.part.is_file() and self.progress.is_file():
            try:
                info = json.loads(self.progress.read_text())
                listed = {i for i in info.get("verified", []) if type(i) is int and 0 <= i < self.w.n_chunks}
            except (OSError, ValueError, AttributeError):
                return None, set()
            if info.get("id") == self.w.cid:
                return self.part, listed
        return None, set()

    def open_part(self) -> None:
        if self.fd is None:
            self.fd = os.open(self.part, os.O_RDWR | os.O_CREAT, 0o644)

    def write(self, i: int, chunk: memoryview) -> None:
        self.open_part()
        lo, _ = _span(i, self.w.nbytes, self.chunk_bytes)
        got = 0
        while got < chunk.nbytes:
            got += os.pwritev(self.fd, [chunk[got:]], lo + got)
        self.verified.add(i)
        if time.monotonic() - self._saved_at >= _PROGRESS_EVERY_S:
            self.save()

    def save(self) -> None:
        from .._io import atomic_write

        if self.fd is None:
            return
        os.fsync(self.fd)
        atomic_write(self.progress, json.dumps({"id": self.w.cid, "verified": sorted(self.verified)}),
                     flag="cache")
        self._saved_at = time.monotonic()

    def finish(self) -> None:
        if self.fd is None:
            if not (self.part.is_file() and len(self.verified) == self.w.n_chunks):
                return
            self.open_part()
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None
        if len(self.verified) == self.w.n_chunks:
            # another process filling the same entry may have renamed it first: same bytes, same name
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.part, self.final)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.progress)
        else:
            from .._io import atomic_write

            atomic_write(self.progress, json.dumps({"id": self.w.cid, "verified": sorted(self.verified)}),
                         flag="cache")


class _Receiver:
    """Moves chunks into destinations: straight into host bytes, or through one pinned staging
    buffer to a device."""

    def __init__(self, chunk_bytes: int, stats: FetchStats) -> None:
        self.chunk_bytes = chunk_bytes
        self.stats = stats
        self._staging: Any = None
        self._staging_mv: memoryview | None = None

    def view(self, w: _Want, i: int) -> memoryview:
        lo, hi = _span(i, w.nbytes, self.chunk_bytes)
        if w.host is not None:
            return w.host[lo:hi]
        if self._staging is None:
            import torch

            self._staging = torch.empty(self.chunk_bytes, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
            self._staging_mv = memoryview(self._staging.numpy()).cast("B")
        return self._staging_mv[:hi - lo]

    def land(self, w: _Want, i: int, chunk: memoryview) -> bool:
        """Verify chunk ``i`` (already in ``view(w, i)``); copy it to the device when staged.
        True when it matches its digest."""
        if hashlib.sha256(chunk).digest() != w.digest(i):
            return False
        if w.host is None:
            lo, hi = _span(i, w.nbytes, self.chunk_bytes)
            _byte_view(w.tensor)[lo:hi].copy_(self._staging[:hi - lo])
        w.done.add(i)
        return True


def _byte_view(t: Any) -> Any:
    import torch

    return t.reshape(-1).view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)


def _copy_same(w: _Want, stats: FetchStats) -> None:
    """Fill ``w`` from the tensor of this fetch with the same content (verified already)."""
    if w.nbytes:
        _byte_view(w.tensor).copy_(_byte_view(w.same_as.tensor))
    w.done = set(range(w.n_chunks))
    stats.chunks_deduplicated += w.n_chunks


def _from_cache(w: _Want, rx: _Receiver, stats: FetchStats) -> None:
    path, chunks = w.cache.cached_chunks()
    if path is None or not chunks:
        return
    bad = False
    with open(path, "rb", buffering=0) as f:
        for i in sorted(chunks):
            lo, hi = _span(i, w.nbytes, rx.chunk_bytes)
            mv = rx.view(w, i)
            got = 0
            while got < mv.nbytes:
                n = os.preadv(f.fileno(), [mv[got:]], lo + got)
                if n <= 0:
                    break
                got += n
            if got == mv.nbytes and rx.land(w, i, mv):
                stats.chunks_from_cache += 1
                stats.chunk_bytes_from_cache += hi - lo
            else:
                bad = True
    if path == w.cache.part:
        w.cache.verified = set(w.done)
    elif bad:  # a damaged complete file: keep its good chunks as a partial entry, refetch the rest
        os.replace(path, w.cache.part)
        w.cache.verified = set(w.done)
        w.cache.open_part()
        w.cache.save()


def _fetch_missing(conn: Connection, w: _Want, rx: _Receiver, lim: BridgeLimits, stats: FetchStats,
                   chunk_retries: int) -> None:
    failures: dict[int, int] = {}
    while True:
        missing = [i for i in range(w.n_chunks) if i not in w.done]
        if not missing:
            return
        stats.requested_chunks.extend((w.name, i) for i in missing)
        _send(conn, {"op": "get", "name": w.name, "chunks": _ranges(missing)})
        for i in missing:
            view = rx.view(w, i)
            message, _ = _recv(conn, _Expect(lim.max_message_bytes, view))
            if message.get("op") == "error":
                raise BridgeError(f"bridge: the server refused: {str(message.get('message'))[:300]}")
            if message.get("op") != "chunk" or message.get("name") != w.name or message.get("index") != i:
                raise _broken(conn, f"expected chunk {i} of {w.name!r}, got {str(message)[:200]}")
            if rx.land(w, i, view):
                stats.chunks_from_network += 1
                stats.chunk_bytes_from_network += view.nbytes
                if w.cache is not None:
                    w.cache.write(i, view)
            else:
                failures[i] = failures.get(i, 0) + 1
                stats.chunks_refetched += 1
                log.warning("link bridge: chunk %d of %s failed its sha256 check (%d)", i, w.name, failures[i])
                if failures[i] > chunk_retries:
                    raise BridgeError(f"bridge: chunk {i} of {w.name!r} failed its sha256 check "
                                      f"{failures[i]} times; giving up")


def fetch_tensors(connection: Connection | Callable[[], Connection], names: Sequence[str],
                  dest: Mapping[str, Any] | None = None, cache_dir: str | os.PathLike | None = None, *,
                  device: str = "cpu", pin_memory: bool = False, limits: BridgeLimits | None = None,
                  chunk_retries: int = 2, reconnects: int = 3, stats: FetchStats | None = None,
                  close: bool = True) -> dict[str, Any]:
    """Fetch tensors ``names`` from a ``BridgeServer`` into ``dest[name]`` (torch tensors of the
    right dtype and shape, on any device) or into tensors allocated on ``device`` (pinned with
    ``pin_memory`` when CUDA is present). ``connection``: a Link connection, or a function that
    dials one (then a dropped connection is dialed again up to ``reconnects`` times, resuming at
    the first unverified chunk). ``cache_dir``: reuse and fill a content-addressed cache.
    Returns {name: tensor}; ``stats`` (a FetchStats) is filled in."""
    lim = limits or BridgeLimits()
    stats = stats if stats is not None else FetchStats()
    names = list(names)
    if len(set(names)) != len(names):
        raise BridgeError("bridge: a tensor name is asked for twice")
    dial = connection if callable(connection) and not isinstance(connection, Connection) else None
    conn: Connection | None = connection if dial is None else None
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else None
    if cache_root is not None:
        cache_root.mkdir(parents=True, exist_ok=True)
    wants: list[_Want] | None = None
    rx: _Receiver | None = None
    attempt = 0
    try:
        while True:
            try:
                if conn is None or conn.closed:
                    conn = dial()
                if wants is None:
                    _send(conn, {"op": "index", "names": names})
                    message, data = _recv(conn, _Expect(lim.max_message_bytes, None, lim.max_digest_bytes))
                    chunk, wants = _parse_index(message, data, names, lim)
                    rx = _Receiver(chunk, stats)
                    first: dict[str, _Want] = {}
                    for w in wants:
                        _destination(w, (dest or {}).get(w.name), device, pin_memory)
                        prior = first.setdefault(w.cid, w)
                        w.same_as = prior if prior is not w else None
                        if cache_root is not None and w.same_as is None:
                            w.cache = _CacheEntry(cache_root, w, chunk)
                            _from_cache(w, rx, stats)
                for w in wants:
                    if w.same_as is None:
                        _fetch_missing(conn, w, rx, lim, stats, chunk_retries)
                        if w.cache is not None:
                            w.cache.finish()
                for w in wants:
                    if w.same_as is not None and not w.done:
                        _copy_same(w, stats)
                with contextlib.suppress(LinkError):
                    _send(conn, {"op": "bye"})
                break
            except BridgeError:
                raise
            except LinkError as e:
                if dial is None or attempt >= reconnects:
                    raise
                attempt += 1
                stats.reconnects += 1
                log.warning("link bridge: connection lost (%s); resuming (%d of %d)", e, attempt, reconnects)
                if conn is not None:
                    conn.close()
                conn = None
    finally:
        for w in wants or []:
            if w.cache is not None and w.cache.fd is not None:
                with contextlib.suppress(OSError, LinkError):
                    w.cache.finish()
        if conn is not None and (close or dial is not None):
            conn.close()
    return {w.name: w.tensor for w in wants}
