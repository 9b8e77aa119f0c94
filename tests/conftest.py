"""Shared test set-up."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """The test models are tiny: one intra-op thread is as fast, and immune to OpenMP spin on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True, scope="session")
def _float32_auto_dtype():
    """`dtype="auto"` is float32 on every test machine: with native bf16 it would be bfloat16, so the suite would test
    different arithmetic on different CPUs. Session-scoped, so module fixtures see it too. Tests that need bf16 ask
    for it; tests of the auto rule set their own CPU flags (a test's monkeypatch overrides this one)."""
    import dgemma.model.device

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dgemma.model.device, "cpu_info", lambda path="": ("", set()))
        yield
