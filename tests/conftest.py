"""Shared pytest configuration: skip `gpu` tests cleanly where CUDA or vllm is missing."""

from __future__ import annotations

import importlib.util

import pytest
import torch


def _gpu_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (none visible to torch)"
    if importlib.util.find_spec("vllm") is None:
        return "needs vllm (pip install -e '.[vllm]')"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _gpu_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
