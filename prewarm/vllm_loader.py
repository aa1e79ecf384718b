"""vLLM's ``--load-format prewarm``: the checked reader (prewarm.loader) as a vLLM model loader.

Registered through the ``vllm.general_plugins`` entry point, so any vLLM started where prewarm is
installed has it. The tensors go to the model's own ``load_weights``: tensor parallelism,
quantization and weight-name mapping stay vLLM's. Settings come from
``--model-loader-extra-config '{"check": "hash", "threads": 16, "buffers": 20}'``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Generator
from pathlib import Path

import torch
from torch import nn
from vllm.config import ModelConfig, get_current_vllm_config
from vllm.config.load import LoadConfig
from vllm.model_executor.model_loader import register_model_loader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

from prewarm.engine import REPORT_ENV
from prewarm.errors import PrewarmError
from prewarm.fsutil import write_file_atomic
from prewarm.loader import CheckedReader, LoadOptions, LoadRefused

log = logging.getLogger("vllm.prewarm")  # under vLLM's logger, so its handlers print it
LOAD_FORMAT = "prewarm"


class LoadFailed(RuntimeError):
    """A PrewarmError as vLLM shows it: the last line of the engine's traceback, one sentence."""

    def __init__(self, error: PrewarmError) -> None:
        hint = f" ({error.hint})" if error.hint else ""
        super().__init__(f"prewarm load format: {error}{hint}")


class PrewarmModelLoader(DefaultModelLoader):
    """vLLM's default loader with the weights read, checked and placed by prewarm.loader."""

    def __init__(self, load_config: LoadConfig) -> None:  # DefaultModelLoader's own refuses our settings
        self.load_config = load_config
        self.local_expert_ids = None
        self._encoder_only_lm_prefixes = None
        self._encoder_only_weights_mapper = None
        self.enable_weights_track = None
        extra = load_config.model_loader_extra_config
        try:
            if not isinstance(extra, dict):
                raise LoadRefused(f"--model-loader-extra-config must be a JSON object, not {type(extra).__name__}")
            self.options = LoadOptions.from_config(extra)
        except PrewarmError as exc:
            raise LoadFailed(exc) from None

    def download_model(self, model_config: ModelConfig) -> None:
        self._directory(model_config)

    def _directory(self, model_config: ModelConfig) -> Path:
        directory = Path(model_config.model)
        if not directory.is_dir():
            raise LoadFailed(
                LoadRefused(
                    "loads a local serving directory, not a hub id",
                    model_config.model,
                    hint="pass a directory that `prewarm reshard` or `prewarm fetch` made as --model",
                )
            )
        return directory

    def get_all_weights(self, model_config: ModelConfig, model: nn.Module) -> Generator[tuple[str, torch.Tensor], None, None]:
        if getattr(model, "secondary_weights", ()):
            raise LoadFailed(LoadRefused("this model has secondary weight sources, which the prewarm format does not load"))
        configured = self.load_config.device or get_current_vllm_config().device_config.device  # a parameter's may be meta
        device = configured or next(model.parameters()).device
        try:
            reader = CheckedReader(self._directory(model_config), device, self.options)
        except PrewarmError as exc:
            raise LoadFailed(exc) from None
        self.counter_before_loading_weights = time.perf_counter()
        try:
            yield from reader.tensors()
        except PrewarmError as exc:
            raise LoadFailed(exc) from None
        _report(reader)


def _report(reader: CheckedReader) -> None:
    report = reader.report
    checked = "every byte hashed (xxh3-128)" if report.hashed else "unchanged since a passed verification, not hashed"
    log.info(
        "prewarm loader: %d tensors, %.2f GB from %d files in %.2f s (%.2f GB/s) onto %s; %s",
        report.tensors,
        report.bytes / 1e9,
        report.files,
        report.seconds,
        report.gb_per_s,
        report.device,
        checked,
    )
    target = os.environ.get(REPORT_ENV)
    if target:
        try:
            write_file_atomic(Path(target), (json.dumps(report.as_dict()) + "\n").encode(), 0o600)
        except (PrewarmError, OSError) as exc:
            log.warning("prewarm loader: could not write the load report to %s: %s", target, exc)


def register() -> None:
    """vLLM calls this in every process it starts (vllm.general_plugins); it may call it twice."""
    from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER

    if _LOAD_FORMAT_TO_MODEL_LOADER.get(LOAD_FORMAT) is not PrewarmModelLoader:
        register_model_loader(LOAD_FORMAT)(PrewarmModelLoader)
