"""Where the project's checkpoints and the shared data live: one setting each."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINTS = PROJECT_ROOT / "checkpoints"
DATA_ROOT_ENV = "CXR_DEMO_DATA_ROOT"


def data_root() -> Path:
    """The shared data folder: ``CXR_DEMO_DATA_ROOT``, else ``../shared/data`` beside the project.

    It holds ``nih14/``, ``kermany/``, ``covid19/`` and ``lungseg/`` in the layout its README describes;
    the app works without it (no examples, no NIH boxes), training and the benchmarks need it.
    """
    env = os.environ.get(DATA_ROOT_ENV)
    return Path(env) if env else PROJECT_ROOT.parent / "shared" / "data"
