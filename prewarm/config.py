"""Where prewarm keeps things, from the environment (the one module that reads it for prewarm).

huggingface_hub reads its own variables (HF_TOKEN, HF_HOME, HF_ENDPOINT, HF_HUB_OFFLINE).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$PREWARM_CACHE``; else ``$HF_HOME/prewarm`` when HF_HOME is set (it is where the user put
    large downloads); else ``$XDG_CACHE_HOME/prewarm`` or ``~/.cache/prewarm``."""
    if os.environ.get("PREWARM_CACHE"):
        return Path(os.environ["PREWARM_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "prewarm"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "prewarm"


def debug_enabled() -> bool:
    return os.environ.get("PREWARM_DEBUG") == "1"
