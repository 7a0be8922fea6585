"""Process-level settings for running on the CPU backend: XLA flags and host memory.

Imports no JAX, so `set_default_xla_flags` can run before JAX creates its backends (XLA reads
`XLA_FLAGS` once, when the first backend is created; a flag set later has no effect, and XLA:CPU
takes this one from the environment only: per-compile `compiler_options` do not reach it).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import MutableMapping

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
