"""Writing files a person names (``-o``, ``--export``, ``--trace``, ``--plot``, ``Plan.save``,
``Recorder.to_csv``): checked before the work, written so that nothing but the named file changes.

    check_writable(path, flag="-o")      BadInputError now, before minutes of work, when ``path``
                                         cannot be written: a folder, a missing folder, a
                                         read-only place, a symlink loop
    atomic_write(path, text_or_bytes)    write it; returns the path
    with atomic_open(path, "w") as f:    the same for writers that stream (CSV rows, a PNG)

What is replaced, by what the path is:
    a new name or a regular file         a temporary file beside it, renamed over it when
                                         complete: a reader sees the old file or the new one,
                                         never half of one; the old file's permission bits kept
    a symlink                            followed to its target, which is written as above
                                         (atomically when it is a regular file)
    a device node, FIFO, socket ...      written directly (``-o /dev/stdout``); a rename would
                                         replace the node itself with a regular file
The temporary file is removed on every error, KeyboardInterrupt included.
"""
from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .errors import BadInputError, VramancerError

__all__ = ["atomic_open", "atomic_write", "check_writable", "write_target"]


def _umask() -> int:
    """The process umask, read without changing it (Linux /proc); 0o022 elsewhere."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def write_target(path: str | os.PathLike, flag: str = "output") -> Path:
    """The file a write to ``path`` really lands on: ``path`` itself, or its symlink's final
    target. BadInputError for an empty path or a symlink loop."""
    text = os.fspath(path)
    if not str(text).strip():
        raise BadInputError(f"{flag}: an empty path")
    p = Path(text).expanduser()
    if p.is_symlink():
        try:
            return Path(os.path.realpath(p, strict=True))
        except FileNotFoundError:      # a dangling link: its target is created
            return Path(os.path.realpath(p))
        except OSError as e:
            raise BadInputError(f"{flag} {p}: {e.strerror or e} (a symlink loop?)") from None
    return p


def check_writable(path: str | os.PathLike, flag: str = "output") -> Path:
    """Refuse, now and in one line, a ``path`` that a later ``atomic_write`` could not write;
    returns the path written in the end (see ``write_target``). Probes the folder by creating
    and removing a temporary file (permission bits do not bind root; a read-only mount does)."""
    try:
        return _check_writable(path, flag)
    except ValueError as e:            # an embedded NUL byte and the like
        if isinstance(e, BadInputError):
            raise
        raise BadInputError(f"{flag} {os.fspath(path)!r}: not a usable path ({e})") from None


def _tmp_prefix(target: Path) -> str:
    return f".{target.name[:200]}."    # room for the random part within a 255-byte name


def _check_writable(path: str | os.PathLike, flag: str) -> Path:
    shown = os.fspath(path)
    if str(shown).endswith(("/", os.sep)):
        raise BadInputError(f"{flag} {shown}: names a folder; name a file")
    target = write_target(path, flag)
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise BadInputError(f"{flag} {shown}: {e.strerror or e}") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise BadInputError(f"{flag} {shown}: is a folder; name a file in it")
    if st is not None and not stat.S_ISREG(st.st_mode):
        if not os.access(target, os.W_OK):
            raise BadInputError(f"{flag} {shown}: not writable")
        return target                   # a device / FIFO: written directly, nothing to probe
    folder = target.parent
    if not folder.exists():
        raise BadInputError(f"{flag} {shown}: folder {folder} does not exist")
    if not folder.is_dir():
        raise BadInputError(f"{flag} {shown}: {folder} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=_tmp_prefix(target), suffix=".probe", dir=folder)
    except OSError as e:
        raise BadInputError(f"{flag} {shown}: cannot write in folder {folder} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)
    return target


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, flag: str = "output", encoding: str | None = "utf-8",
                newline: str | None = None) -> Iterator[IO[Any]]:
    """A file object whose contents replace ``path`` when the ``with`` block ends without an
    error (see the module docstring for what is replaced how). ``mode``: "w" or "wb"."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open mode must be 'w' or 'wb', not {mode!r}")
    kwargs: dict[str, Any] = {} if "b" in mode else {"encoding": encoding, "newline": newline}
    target = check_writable(path, flag)
    try:
        st: os.stat_result | None = os.stat(target)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        try:
            with open(target, mode, **kwargs) as f:
                yield f
        except OSError as e:
            raise VramancerError(f"cannot write {os.fspath(path)}: {e.strerror or e}") from None
        return
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(target), suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, stat.S_IMODE(st.st_mode) if st is not None else 0o666 & ~_umask())
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise VramancerError(f"cannot write {os.fspath(path)}: {e.strerror or e}") from None
        raise


def atomic_write(path: str | os.PathLike, data: str | bytes, *, flag: str = "output") -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` as ``atomic_open`` does; returns ``path``."""
    with atomic_open(path, "wb" if isinstance(data, (bytes, bytearray, memoryview)) else "w", flag=flag) as f:
        f.write(data)
    return Path(path)
