"""Shared pytest configuration. Fixtures for areas live in tests/<area>/conftest.py and tests/support/."""

# The Kubernetes control plane / Prometheus fixtures (kube_cluster, kube_namespace, prometheus) are used by
# tests/cluster/ and tests/operator/, so they are registered for the whole suite. Importing the plugin is
# cheap: nothing starts until a test asks for a fixture.
pytest_plugins = ["support.cluster_fixtures"]

import os  # noqa: E402

import pytest  # noqa: E402

# Tiny models on a shared 2-core machine: extra intra-op threads only contend (~10x slower per op).
# Subprocesses (multi-process tests, `moefleet serve`) inherit the environment variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

# Triton kernels are tested on CPU-only machines (CI) under Triton's interpreter. triton.jit reads
# TRITON_INTERPRET when a kernel - and triton.language's own helpers (tl.sum, tl.cdiv) - are decorated, i.e.
# at first import, so it is set here, before any test module can import triton. GPU machines compile.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    import torch

    torch.set_num_threads(1)
    yield
