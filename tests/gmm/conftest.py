"""Fixtures for tests/gmm: ``cupy_standin`` runs the GPU code paths on the CPU (cupy_standin.py)."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("mmfm_tests_cupy_standin", Path(__file__).with_name("cupy_standin.py"))
standin = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(standin)


@pytest.fixture
def cupy_standin(monkeypatch):
    """A fresh strict CuPy stand-in as ``sys.modules["cupy"]`` (with ``cuml.cluster.KMeans``): one
    device, 64 GiB free (set ``.memory["free"]``); ``.transfers`` lists every host/device copy."""
    return standin.install(monkeypatch)
