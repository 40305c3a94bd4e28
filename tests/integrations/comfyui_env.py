"""A real ComfyUI for the integration tests: unpacked and given its own venv once, cached.

The tarball (``../shared/thirdparty/ComfyUI-*.tar.gz`` beside the checkout, or
``$VRAMANCER_COMFYUI_TARBALL``) is a test fixture only. The cache (``$VRAMANCER_TEST_CACHE`` or
``~/.cache/vramancer-tests``) holds ``comfyui-<tarball sha256[:16]>-<requirements hash>/ComfyUI`` and
``.../venv``; a ``.ready`` file marks a finished build, so an interrupted build is redone. The venv is
separate from the one running the tests: torch 2.14.1 with torchvision 0.29.1 (ComfyUI imports
torchvision), ComfyUI's requirements minus torch / torchvision / torchaudio, ``requests``, and
vramancer's own dependencies; vramancer itself is put on that venv's path by a ``.pth`` file naming
this checkout (an editable install that writes nothing into the checkout or into the tests' venv).
Run ``python -m tests.integrations.comfyui_env`` to build it ahead of a test run.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ComfyEnv", "REPO_ROOT", "build_comfy_env", "cache_lock", "find_tarball"]

REPO_ROOT = Path(__file__).resolve().parents[2]
TORCH_PINS = ("torch==2.14.1", "torchvision==0.29.1")
_SKIPPED_REQUIREMENTS = {"torch", "torchvision", "torchaudio"}


@dataclass(frozen=True)
class ComfyEnv:
    comfy_dir: Path      # the unpacked ComfyUI source tree (holds main.py)
    python: Path         # the separate venv's interpreter
    build_seconds: float  # 0.0 when the cached build was reused


def find_tarball() -> Path | None:
    named = os.environ.get("VRAMANCER_COMFYUI_TARBALL")
    if named:
        return Path(named) if Path(named).is_file() else None
    for folder in (REPO_ROOT.parent / "shared" / "thirdparty", REPO_ROOT / "shared" / "thirdparty"):
        found = sorted(folder.glob("ComfyUI-*.tar.gz")) if folder.is_dir() else []
        if found:
            return found[-1]
    return None


def _cache_root() -> Path:
    named = os.environ.get("VRAMANCER_TEST_CACHE")
    return Path(named) if named else Path.home() / ".cache" / "vramancer-tests"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _requirement_name(line: str) -> str:
    name = line.split(";")[0].strip()
    for sep in ("==", ">=", "<=", "~=", "!=", ">", "<", "[", " "):
        name = name.split(sep)[0]
    return name.strip().lower()


def _comfy_requirements(comfy_dir: Path) -> list[str]:
    kept = []
    for raw in (comfy_dir / "requirements.txt").read_text().splitlines():
        line = raw.split("#")[0].strip()
        if line and _requirement_name(line) not in _SKIPPED_REQUIREMENTS:
            kept.append(line)
    return kept


def _vramancer_requirements() -> list[str]:
    """vramancer's own dependencies (no extras), as the tests' environment has it installed."""
    from importlib.metadata import requires

    return [r.split(";")[0].strip() for r in requires("vramancer") or [] if "extra ==" not in r]


def _pip(python: Path, args: list[str], log) -> None:
    cmd = [str(python), "-m", "pip", "install", "--no-input", *args]
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)


def _link_checkout(python: Path) -> None:
    """Put this checkout on the ComfyUI venv's path (rewritten every run: the checkout may move)."""
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    pth = Path(purelib) / "vramancer-checkout.pth"
    wanted = f"{REPO_ROOT}\n"
    if not pth.exists() or pth.read_text() != wanted:
        pth.write_text(wanted)


@contextmanager
def cache_lock(name: str):
    """An exclusive lock on ``<cache>/<name>.lock``: pytest-xdist workers build one thing once."""
    import fcntl

    root = _cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with (root / f"{name}.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_comfy_env(tarball: Path, log_path: Path | None = None) -> ComfyEnv:
    """Unpack ComfyUI and build its venv unless a finished build for this tarball is cached."""
    with cache_lock("comfyui-env"):
        return _build_comfy_env(tarball, log_path)


def _build_comfy_env(tarball: Path, log_path: Path | None) -> ComfyEnv:
    deps = hashlib.sha256("\n".join([*TORCH_PINS, *_vramancer_requirements()]).encode()).hexdigest()[:8]
    root = _cache_root() / f"comfyui-{_sha256(tarball)[:16]}-{deps}"
    comfy_dir, venv = root / "ComfyUI", root / "venv"
    python = venv / "bin" / "python"
    ready = root / ".ready"
    started = time.monotonic()
    built = False
    if not ready.exists():
        built = True
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        with tarfile.open(tarball) as archive:
            archive.extractall(root, filter="data")
        if not (comfy_dir / "main.py").is_file():
            raise RuntimeError(f"{tarball} does not unpack to ComfyUI/main.py")
        log_path = log_path or root / "build.log"
        with log_path.open("w") as log:
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, stdout=log, stderr=subprocess.STDOUT)
            _pip(python, list(TORCH_PINS), log)
            _pip(python, [*_comfy_requirements(comfy_dir), "requests", *_vramancer_requirements()], log)
        ready.write_text(f"{time.monotonic() - started:.1f} s\n")
    _link_checkout(python)
    return ComfyEnv(comfy_dir=comfy_dir, python=python,
                    build_seconds=time.monotonic() - started if built else 0.0)


if __name__ == "__main__":
    found = find_tarball()
    if found is None:
        sys.exit("no ComfyUI tarball found (../shared/thirdparty/ComfyUI-*.tar.gz or $VRAMANCER_COMFYUI_TARBALL)")
    env = build_comfy_env(found)
    print(f"ComfyUI at {env.comfy_dir}, python {env.python}, built in {env.build_seconds:.1f} s")
