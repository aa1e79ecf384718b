"""prewarm: make a local LLM start instantly and stay hot."""

__version__ = "0.1.0"
