"""The user's config file: default planner options, so a person with the same GPUs every day
does not type ``--devices`` each time.

    # ~/.config/vramancer/config.toml   ($XDG_CONFIG_HOME/vramancer/config.toml; VRAMANCER_CONFIG wins)
    devices = "rtx3090,rtx3060,cpu:64GiB"
    reserve = "1GiB"
    context = 8192
    dtype = "bfloat16"
    backing = "cpu"

Each key is the default of the flag of the same name in the commands that plan (``plan``, ``run``,
``chat``, ``serve``, and ``devices`` for devices/backing); a flag on the command line wins. A
missing file is no config; a malformed one (bad TOML, an unknown key, a value of the wrong type)
is one line and exit 2 (:class:`ConfigFileError`).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import tomllib

from . import envs
from .errors import BadInputError

__all__ = ["CONFIG_COMMANDS", "Config", "ConfigFileError", "config_defaults", "config_path", "load_config"]

_PLANNER_KEYS = ("devices", "reserve", "context", "dtype", "backing")
# command -> the config keys that set its flags' defaults (each is a flag of that command)
CONFIG_COMMANDS: dict[str, tuple[str, ...]] = {
    "plan": _PLANNER_KEYS, "run": _PLANNER_KEYS, "chat": _PLANNER_KEYS, "serve": _PLANNER_KEYS,
    "devices": ("devices", "backing"),
}


class ConfigFileError(BadInputError):
    """The config file exists but cannot be used (exit 2)."""


@dataclass(frozen=True)
class Config:
    """Defaults from the config file; None = not set there (the built-in default applies)."""

    devices: str | None = None
    reserve: str | None = None
    context: int | None = None
    dtype: str | None = None
    backing: str | None = None
    path: Path | None = None            # the file these came from (None: no file)

    def defaults(self) -> dict[str, str | int]:
        """The argparse defaults this config sets: dest -> value, only the keys present."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "path" and getattr(self, f.name) is not None}


_TYPES: dict[str, type] = {"devices": str, "reserve": str, "context": int, "dtype": str, "backing": str}


def config_path() -> Path:
    """$VRAMANCER_CONFIG, else $XDG_CONFIG_HOME/vramancer/config.toml, else ~/.config/vramancer/config.toml."""
    return Path(envs.get("VRAMANCER_CONFIG")).expanduser()


def load_config(path: str | Path | None = None) -> Config:
    """The config at ``path`` (default :func:`config_path`); an empty Config when there is no file."""
    path = Path(path) if path is not None else config_path()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return Config()
    except OSError as e:
        raise ConfigFileError(f"config file {path}: cannot read it ({e.strerror or e})") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigFileError(f"config file {path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigFileError(f"config file {path}: not valid TOML ({e})") from None
    values: dict[str, str | int] = {}
    for key, value in doc.items():
        want = _TYPES.get(key)
        if want is None:
            raise ConfigFileError(f"config file {path}: unknown key {key!r} "
                                  f"(known: {', '.join(_TYPES)})")
        if want is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigFileError(f"config file {path}: {key} must be an integer (got {value!r})")
        if want is str and not isinstance(value, str):
            raise ConfigFileError(f"config file {path}: {key} must be a string in quotes (got {value!r})")
        if want is str and not value.strip():
            raise ConfigFileError(f"config file {path}: {key} is empty")
        values[key] = value
    if "context" in values and int(values["context"]) < 1:
        raise ConfigFileError(f"config file {path}: context must be at least 1 (got {values['context']})")
    return Config(path=path, **values)  # type: ignore[arg-type]


def config_defaults(command: str) -> dict[str, str | int]:
    """The argparse defaults the config file sets for ``command`` ({} for commands it does not touch)."""
    keys = CONFIG_COMMANDS.get(command)
    if not keys:
        return {}
    return {k: v for k, v in load_config().defaults().items() if k in keys}
