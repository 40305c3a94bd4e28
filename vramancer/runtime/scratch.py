"""The disk tier's scratch files: made here, removed however the process ends.

    folder = make_offload_dir(root)   # root/<pid>-<random>/, after sweeping root of dead processes'
    track(path)                       # also remove this file (one written into a folder the caller gave)
    release(path)                     # remove it now (SplitRuntime.detach, a failed load)

A path made or tracked here is removed when released, at a normal interpreter exit (atexit: a
return, an exception, Ctrl-C's KeyboardInterrupt), and on SIGTERM (a handler installed from the
main thread while scratch exists, only where SIGTERM had its default action; it removes the
scratch, restores the default and re-raises the signal, so the process still ends by SIGTERM).
SIGKILL cannot be caught: the next ``make_offload_dir`` removes folders whose name starts with the
pid of a process that no longer exists. Nothing is installed at import.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path

__all__ = ["make_offload_dir", "track", "release", "release_all", "sweep_stale", "pid_alive"]

_DIR_RE = re.compile(r"^(\d+)-")
_lock = threading.RLock()   # re-entered by the SIGTERM handler
_paths: set[str] = set()
_state = {"atexit": False, "sigterm": False}


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one of another user's counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True


def sweep_stale(root: str | os.PathLike) -> list[Path]:
    """Remove the folders in ``root`` named ``<pid>-...`` whose process no longer exists (left by a
    run that was killed); returns those removed. Our own pid's and live processes' are kept."""
    removed = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for e in entries:
        m = _DIR_RE.match(e.name)
        if not m or not e.is_dir(follow_symlinks=False):
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or pid_alive(pid):
            continue
        shutil.rmtree(e.path, ignore_errors=True)
        if not os.path.exists(e.path):
            removed.append(Path(e.path))
    return removed


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
            os.unlink(path)


def release(path: str | os.PathLike | None) -> None:
    """Remove a folder or file made or tracked here, now."""
    if path is None:
        return
    p = os.fspath(path)
    with _lock:
        _paths.discard(p)
    _remove(p)


def release_all() -> None:
    """Remove every scratch path still held (the atexit and SIGTERM handlers call this)."""
    with _lock:
        held = list(_paths)
        _paths.clear()
    for p in held:
        _remove(p)


def _on_sigterm(signum, frame) -> None:  # noqa: ARG001 - a signal handler's signature
    release_all()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _install() -> None:
    """atexit once; the SIGTERM handler once, from the main thread, where SIGTERM is still default."""
    if not _state["atexit"]:
        atexit.register(release_all)
        _state["atexit"] = True
    if not _state["sigterm"] and threading.current_thread() is threading.main_thread():
        try:
            if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
                signal.signal(signal.SIGTERM, _on_sigterm)
            _state["sigterm"] = True
        except (ValueError, OSError):  # not the main interpreter / no signals here
            pass


def track(path: str | os.PathLike) -> str:
    """Remove ``path`` (a file or folder) when the process ends, unless released before."""
    p = os.fspath(path)
    with _lock:
        _paths.add(p)
    _install()
    return p


def make_offload_dir(root: str | os.PathLike) -> str:
    """A new folder ``root/<pid>-<random>`` for this process's offload files, tracked (see the
    module docstring); stale folders of dead processes in ``root`` are removed first."""
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
        sweep_stale(root)
        return track(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=root))
    except OSError as e:   # the cache folder is a file, read-only, full: say which, in one line
        from ..errors import BadInputError

        raise BadInputError(f"cannot make the disk tier's offload folder in {root}: {e.strerror or e} "
                            f"(set VRAMANCER_CACHE_DIR to a writable folder)") from None
