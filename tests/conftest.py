"""Shared pytest setup: the `slow` marker is skipped unless --runslow is given."""

import os

# Tests run on the CPU; keep TF quiet and away from any accelerator.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

# With torch installed, importing tensorflow before torchvision (which loads triton) crashes the
# process; taking torchvision first, when it exists, avoids that for every test module.
try:
    import torchvision  # noqa: F401
except ImportError:
    pass


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run slow tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
