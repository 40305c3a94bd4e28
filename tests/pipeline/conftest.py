from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from .tiny import KINDS, build_pipeline


@pytest.fixture(scope="session")
def pipelines(tmp_path_factory) -> dict[str, Path]:
    """The four tiny pipelines, saved once per session."""
    root = tmp_path_factory.mktemp("pipelines")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {k: build_pipeline(k, root / k) for k in KINDS}
