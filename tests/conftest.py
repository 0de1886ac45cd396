"""Shared fixtures: small, deterministic, CPU."""

from __future__ import annotations

import pytest
import torch

from lavp_core.data import load_dataset
from lavp_core.models import create_model


@pytest.fixture(scope="session")
def photos_val():
    return load_dataset("photos", "val")


@pytest.fixture(scope="session")
def lenet():
    return create_model("lenet", 10, weights="random", seed=0)


def snapshot_model(model: torch.nn.Module) -> dict:
    """Everything an attack or proxy must not change: parameters, their .grad, buffers, the mode."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "training": [m.training for m in model.modules()],
    }


def assert_model_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = snapshot_model(model)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    for name, value in before["params"].items():
        assert torch.equal(after["params"][name], value), f"parameter {name} changed"
    for name, value in before["grads"].items():
        got = after["grads"][name]
        assert (got is None) == (value is None), f".grad of {name} appeared or vanished"
        if value is not None:
            assert torch.equal(got, value)
    for name, value in before["buffers"].items():
        assert torch.equal(after["buffers"][name], value), f"buffer {name} changed"


def wait_for_app(at, found, timeout: float = 240.0, what: str = "the result"):
    """Rerun an AppTest script (as a page's polling fragment would) until ``found(at)`` is truthy."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        value = found(at)
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not appear within {timeout:.0f} s; errors: "
                                 f"{[e.value for e in at.error]}")
        time.sleep(0.5)


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A test that runs a command in-process (which chooses its torch threads) leaves the next test the
    thread count it found: results that depend on round-off must not depend on which test ran before."""
    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)
