"""Process-level settings for running on the CPU backend: XLA flags and host memory; and how the
command lines report an input of the user's that does not fit (`reporting_user_errors`).

Imports no JAX, so `set_default_xla_flags` can run before JAX creates its backends (XLA reads
`XLA_FLAGS` once, when the first backend is created; a flag set later has no effect, and XLA:CPU
takes this one from the environment only: per-compile `compiler_options` do not reach it).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
from collections.abc import Callable, MutableMapping

# XLA:CPU's default concurrency-optimised scheduler orders instructions so that more of them can
# run at once, at the price of keeping more buffers alive: the R50-FPN train step at 800 x 1216,
# batch 2, needs 3.84 GiB of temporaries with it and 2.58 GiB with the memory-minimising one, for
# the same step time on 2 cores (docs/performance.md). The flag only concerns XLA:CPU: GPU and
# TPU compilations ignore it.
CPU_XLA_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)


def set_default_xla_flags(environ: MutableMapping[str, str] | None = None) -> str:
    """Adds each of `CPU_XLA_FLAGS` to XLA_FLAGS unless the flag is already set there (so a
    user's own setting wins); returns the new value. Call it before anything runs on JAX."""
    environ = os.environ if environ is None else environ
    flags = environ.get("XLA_FLAGS", "").split()
    names = {f.split("=", 1)[0] for f in flags}
    flags += [f for f in CPU_XLA_FLAGS if f.split("=", 1)[0] not in names]
    environ["XLA_FLAGS"] = " ".join(flags)
    return environ["XLA_FLAGS"]


def release_host_memory() -> bool:
    """Hands the C heap's free pages back to the OS (glibc `malloc_trim`); True if it could.

    Compiling a program and initialising the weights leave a few hundred MB to a GB of freed
    but still resident heap behind (XLA and LLVM work buffers), which the training step's own
    buffers do not reuse: on the CPU backend that memory adds to the training peak (R50-FPN,
    800 x 1216: 0.6 GiB, docs/performance.md). A no-op (False) off glibc.
    """
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is None:
        return False
    return bool(trim(0))


# Exit status of a command line refused by `reporting_user_errors` (absl's for a usage error, too).
USER_ERROR_EXIT_STATUS = 2


class ConfigError(ValueError):
    """The config has keys the base config does not know, or values of the wrong type
    (`main.validate_config`)."""


def reporting_user_errors(
    main: Callable[[list[str]], None], errors: tuple[type[BaseException], ...] = ()
) -> Callable[[list[str]], None]:
    """`main` for absl's app.run, with the library's errors about the user's input (a config,
    checkpoints or weights that do not fit: ConfigError, checkpoint.RestoreError and
    WeightsMismatchError, and `errors`) logged as one message and exit status 2 instead of a
    traceback: their messages say what is wrong and how to fix it. Every other exception
    propagates as it is. (A module run as a script passes its own error classes in `errors`:
    they are its `__main__` copies, not the importable module's.)"""

    @functools.wraps(main)
    def run(argv):
        try:
            return main(argv)
        except Exception as e:
            from mrcnn_jax import checkpoint

            known = (ConfigError, checkpoint.RestoreError, checkpoint.WeightsMismatchError, *errors)
            if not isinstance(e, known):
                raise
            logging.getLogger("absl").error("%s: %s", type(e).__name__, e)
            sys.exit(USER_ERROR_EXIT_STATUS)

    return run
