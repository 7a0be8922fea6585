"""Shared pytest setup: the `slow` marker is skipped unless --runslow is given."""

import os

# Tests run on the CPU; keep TF quiet and away from any accelerator.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

# One persistent XLA compilation cache for the run, shared by every xdist worker and subprocess
# (they inherit the variable): many tests compile the same tiny-model train and predict steps,
# and the resume test alone compiles its train step four times. The pytest process that starts
# first makes a fresh directory and removes it at the end, so every run compiles from scratch
# once and no cache outlives it. MRCNN_JAX_TEST_COMPILE_CACHE=0 turns it off; a
# JAX_COMPILATION_CACHE_DIR already set is used as it is.
_OWN_CACHE = None
if os.environ.get("MRCNN_JAX_TEST_COMPILE_CACHE", "1") != "0" and (
    "JAX_COMPILATION_CACHE_DIR" not in os.environ
):
    _OWN_CACHE = tempfile.mkdtemp(prefix="mrcnn_jax_test_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

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


@pytest.fixture
def parse_flags(monkeypatch):
    """Parses a command line into absl's FLAGS for an in-process `mrcnn_jax.main.main` call."""
    import logging

    from absl import flags

    import mrcnn_jax.main  # noqa: F401 - defines the flags

    # Parsing sets absl's logger to the --verbosity flag's level (WARNING when not run by
    # app.run), which would hide later tests' INFO records from caplog: put it back after.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level

    def reset():
        flags.FLAGS.unparse_flags()
        for name in [n for n in flags.FLAGS if n.startswith("config.")]:
            delattr(flags.FLAGS, name)  # the override flags config_flags defined while parsing

    def parse(*args):
        argv = ["mrcnn_jax.main", *args]
        monkeypatch.setattr(sys, "argv", argv)  # config_flags reads its overrides from sys.argv
        reset()
        return flags.FLAGS(argv)

    yield parse
    reset()
    absl_logger.setLevel(level)  # setLevel, which also clears the loggers' cached levels


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
