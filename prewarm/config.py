"""Where prewarm keeps things, from the environment (the one module that reads it for prewarm).

huggingface_hub reads its own variables (HF_TOKEN, HF_HOME, HF_ENDPOINT, HF_HUB_OFFLINE).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$PREWARM_CACHE``, else ``$XDG_CACHE_HOME/prewarm``, else ``~/.cache/prewarm``."""
    if os.environ.get("PREWARM_CACHE"):
        return Path(os.environ["PREWARM_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "prewarm"


def debug_enabled() -> bool:
    return os.environ.get("PREWARM_DEBUG") == "1"
