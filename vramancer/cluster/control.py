"""The Ray side of a cluster: start a head or join one with token authentication, connect a driver,
stop only the Ray processes we started.

Ray runs with ``RAY_AUTH_MODE=token`` (Ray >= 2.52): every gRPC and HTTP call between its processes
and from drivers carries the cluster's token, which ``cluster start`` draws (32 random bytes,
url-safe) and writes to a 0600 token file; ``cluster join`` and ``--cluster`` read it from
``--token`` / ``--token-file`` / that file. Ray binds where the person says: ``--host`` is its node
IP address (and the address the Link of that node binds); the dashboard and its job API are off.

Each ``ray start`` gets its own temporary folder (``/tmp/vrm-ray-XXXX``); ``cluster stop`` ends the
processes whose command line names a folder recorded in this node's state file, and nothing else
(another Ray on the machine, another person's, is left alone).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInputError, VramancerError

__all__ = ["ClusterError", "ClusterState", "cluster_dir", "default_token_file", "new_token", "write_token",
           "end_processes", "read_token", "start_head", "join_cluster", "stop_started", "connect", "ray_available",
           "auth_env", "use_token", "check_host", "check_address", "local_address_towards", "DEFAULT_PORT"]

DEFAULT_PORT = 6379
_START_TIMEOUT_S = 120.0
# Ray's drivers rewrite a loopback head address to the machine's own address (services.py
# resolve_ip_for_localhost), where a head bound to loopback does not listen
_LOOPBACK = ("a Ray cluster cannot live on a loopback address (Ray's drivers replace it with this machine's "
             "address); use the machine's LAN address, e.g. --host 192.168.1.10")


class ClusterError(VramancerError):
    """Ray could not be started, joined or reached (one line, exit 1)."""


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def _need_ray() -> None:
    if not ray_available():
        raise ClusterError("the cluster needs Ray: pip install 'vramancer[cluster]'")


def cluster_dir() -> Path:
    """This node's cluster state: next to the config file (``~/.config/vramancer/cluster``)."""
    from .. import envs

    return Path(envs.get("VRAMANCER_CONFIG")).expanduser().parent / "cluster"


def default_token_file() -> Path:
    return cluster_dir() / "token"


def new_token() -> str:
    return secrets.token_urlsafe(32)


def write_token(path: Path, token: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, token.encode() + b"\n")
    finally:
        os.close(fd)


def read_token(token: str | None = None, token_file: str | os.PathLike | None = None) -> str:
    """The cluster token: given, else from ``token_file``, else from this node's token file."""
    if token:
        t = token.strip()
    else:
        path = Path(token_file).expanduser() if token_file else default_token_file()
        if not path.is_file():
            raise BadInputError(f"no cluster token: {path} does not exist (`vramancer cluster start` / `join` "
                                "write it; or name the token file: --token-file / --cluster-token-file)")
        if path.stat().st_mode & 0o077:
            raise BadInputError(f"{path} is readable by others: chmod 600 it")
        t = path.read_text().strip()
    if len(t) < 16 or not t.isprintable() or " " in t:
        raise BadInputError("the cluster token must be at least 16 printable characters without spaces")
    return t


def auth_env(token_path: Path) -> dict[str, str]:
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}


@dataclass
class ClusterState:
    """What this node started: its role, the Ray address, the Ray temp folder of its processes."""

    role: str           # "head" or "worker"
    address: str
    temp_dir: str
    token_file: str

    @staticmethod
    def path() -> Path:
        return cluster_dir() / "state.json"

    def save(self) -> None:
        from .._io import atomic_write

        self.path().parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path(), json.dumps(self.__dict__, indent=2) + "\n", flag="cluster state")

    @classmethod
    def load(cls) -> ClusterState | None:
        from .._json import read_json_file

        p = cls.path()
        if not p.is_file():
            return None
        d = read_json_file(p)
        try:
            return cls(str(d["role"]), str(d["address"]), str(d["temp_dir"]), str(d["token_file"]))
        except (KeyError, TypeError):
            raise BadInputError(f"{p} is malformed; remove it (and stop Ray by hand if it runs)") from None


def _ray_start(args: list[str], env_extra: dict[str, str], temp_dir: str) -> None:
    exe = shutil.which("ray", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if exe is None:
        raise ClusterError("the `ray` command is not on PATH: pip install 'vramancer[cluster]'")
    env = dict(os.environ, **env_extra)
    cmd = [exe, "start", *args, "--temp-dir", temp_dir, "--disable-usage-stats", "--include-dashboard", "false"]
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=_START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        stop_temp_dir(temp_dir)
        raise ClusterError(f"`ray start` did not finish in {_START_TIMEOUT_S:.0f} s") from None
    if out.returncode != 0:
        stop_temp_dir(temp_dir)
        lines = [ln for ln in (out.stderr or out.stdout).splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if "error" in ln.lower()), lines[-1] if lines else "no output")
        raise ClusterError(f"`ray start` failed: {why.strip()[:300]}")


def _check_not_running() -> None:
    st = ClusterState.load()
    if st is not None and _processes_of(st.temp_dir):
        raise BadInputError(f"this node already runs a cluster {st.role} ({st.address}); "
                            "`vramancer cluster stop` first")


def start_head(host: str, port: int = DEFAULT_PORT, token_file: Path | None = None, devices: str = "auto",
               num_cpus: int | None = None) -> tuple[ClusterState, str]:
    """Start a Ray head bound to ``host``:``port`` with token auth; returns (state, token)."""
    _need_ray()
    _check_not_running()
    check_host(host)
    token = new_token()
    token_path = Path(token_file).expanduser() if token_file else default_token_file()
    write_token(token_path, token)
    temp_dir = tempfile.mkdtemp(prefix="vrm-ray-", dir="/tmp")
    args = ["--head", "--node-ip-address", host, "--port", str(port)]
    if num_cpus is not None:
        args += ["--num-cpus", str(num_cpus)]
    _ray_start(args, {**auth_env(token_path), "VRAMANCER_NODE_DEVICES": devices}, temp_dir)
    st = ClusterState("head", f"{host}:{port}", temp_dir, str(token_path))
    st.save()
    return st, token


def join_cluster(address: str, token: str, host: str | None = None, devices: str = "auto",
                 num_cpus: int | None = None) -> ClusterState:
    """Join the cluster at ``address`` (HOST:PORT) as a worker node, with ``token``."""
    _need_ray()
    _check_not_running()
    check_address(address)
    token_path = default_token_file()
    write_token(token_path, token)
    temp_dir = tempfile.mkdtemp(prefix="vrm-ray-", dir="/tmp")
    args = ["--address", address]
    if host:
        args += ["--node-ip-address", host]
    if num_cpus is not None:
        args += ["--num-cpus", str(num_cpus)]
    _ray_start(args, {**auth_env(token_path), "VRAMANCER_NODE_DEVICES": devices}, temp_dir)
    st = ClusterState("worker", address, temp_dir, str(token_path))
    st.save()
    return st


def check_host(host: str) -> str:
    """An address Ray can bind for other machines: not empty, not loopback, not every interface."""
    from .._net import is_loopback

    if not host or host in ("0.0.0.0", "::") or any(c.isspace() for c in host):
        raise BadInputError(f"--host must be this machine's address on the network, not {host!r}")
    if is_loopback(host):
        raise BadInputError(_LOOPBACK)
    return host


def check_address(address: str) -> tuple[str, int]:
    from .._net import is_loopback

    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadInputError(f"cluster address must be HOST:PORT, not {address!r}")
    if is_loopback(host.strip("[]")):
        raise BadInputError(_LOOPBACK)
    return host.strip("[]"), int(port)


def _processes_of(temp_dir: str) -> list:
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = p.info["cmdline"] or []
        except (psutil.Error, KeyError):
            continue
        if any(temp_dir in part for part in cmd):
            out.append(p)
    return out


def end_processes(procs: list, timeout_s: float = 15.0) -> None:
    """End ``procs`` (psutil.Process objects): SIGTERM, then SIGKILL for those still alive after
    ``timeout_s``; a process already gone is skipped."""
    import psutil

    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def stop_temp_dir(temp_dir: str, timeout_s: float = 15.0) -> int:
    """End every process whose command line names ``temp_dir`` (SIGTERM, then SIGKILL); how many."""
    procs = _processes_of(temp_dir)
    end_processes(procs, timeout_s)
    shutil.rmtree(temp_dir, ignore_errors=True)
    return len(procs)


def stop_started() -> tuple[ClusterState | None, int]:
    """Stop what ``start_head`` / ``join_cluster`` started on this node; (state, processes ended)."""
    st = ClusterState.load()
    if st is None:
        return None, 0
    n = stop_temp_dir(st.temp_dir)
    ClusterState.path().unlink(missing_ok=True)
    return st, n


def local_address_towards(host: str) -> str:
    """This machine's address on the route to ``host`` (127.0.0.1 for a loopback head): the
    address a driver is reached at; Ray would otherwise pick one interface of its own choosing."""
    import socket

    from .._net import is_loopback

    if is_loopback(host):
        raise BadInputError(_LOOPBACK)
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            return s.getsockname()[0]
    except OSError:
        raise ClusterError(f"no route from this machine to {host}") from None


def use_token(token: str) -> None:
    """Token auth for this process (and the processes it starts) with ``token``: Ray's environment
    variables, and Ray's cached config and token re-read (Ray may have been imported before)."""
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = token
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    try:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except (ImportError, AttributeError):  # pragma: no cover - a Ray without these
        pass


def connect(address: str, token: str | None = None, token_file: str | os.PathLike | None = None) -> None:
    """Connect this process to the Ray cluster at ``address`` (HOST:PORT) as a driver, with token auth."""
    _need_ray()
    import ray

    host, _ = check_address(address)
    tok = read_token(token, token_file)
    if ray.is_initialized():
        return
    use_token(tok)
    t0 = time.monotonic()
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False, configure_logging=False,
                 _node_ip_address=local_address_towards(host))
    except Exception as e:  # noqa: BLE001 - Ray raises many kinds; the person gets one line
        raise ClusterError(f"cannot connect to the cluster at {address} after {time.monotonic() - t0:.0f} s: "
                           f"{str(e).splitlines()[0][:300] if str(e) else type(e).__name__}") from None
