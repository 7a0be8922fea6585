"""Process-level settings: default XLA flags, giving freed heap back to the OS."""

import ctypes
import os
import subprocess
import sys

import pytest

from mrcnn_jax import runtime

FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"


def test_default_flags_are_added_once_and_never_override_the_users():
    env = {}
    assert runtime.set_default_xla_flags(env) == f"{FLAG}=false"
    assert runtime.set_default_xla_flags(env) == f"{FLAG}=false"  # idempotent
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert runtime.set_default_xla_flags(env).split() == [
        "--xla_force_host_platform_device_count=8", f"{FLAG}=false"
    ]
    env = {"XLA_FLAGS": f"{FLAG}=true"}
    assert runtime.set_default_xla_flags(env) == f"{FLAG}=true"


_PROGRAM = """
import sys
from mrcnn_jax import runtime
if sys.argv[1] == "set":
    runtime.set_default_xla_flags()
import jax, jax.numpy as jnp

def f(x):  # many independent temporaries: the concurrency scheduler keeps them alive together
    parts = [jnp.sin(x * (i + 1)) @ x for i in range(8)]
    return sum(p.sum() for p in parts)

x = jnp.ones((512, 512))
print(jax.jit(f).lower(x).compile().memory_analysis().temp_size_in_bytes)
"""


def test_the_flag_reaches_xla_and_lowers_the_temporaries():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"

    def temp_bytes(mode):
        out = subprocess.run(
            [sys.executable, "-c", _PROGRAM, mode], env=env, capture_output=True, text=True,
            check=True,
        )
        return int(out.stdout.split()[-1])

    assert temp_bytes("set") < temp_bytes("default")


def _resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(
    not (os.path.exists("/proc/self/statm") and hasattr(ctypes.CDLL(None), "malloc_trim")),
    reason="needs Linux with glibc",
)
def test_release_host_memory_returns_freed_heap_to_the_os():
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    chunk, count = 4096, 64 * 1024  # 256 MiB in small heap chunks (below the mmap threshold)
    blocks = []
    for _ in range(count):
        p = libc.malloc(chunk)
        libc.memset(p, 1, chunk)  # touch it: resident
        blocks.append(p)
    keep = blocks.pop()  # the top chunk stays, so free() alone cannot shrink the heap
    for p in blocks:
        libc.free(p)
    before = _resident_mb()
    assert runtime.release_host_memory()
    after = _resident_mb()
    libc.free(keep)
    assert before - after > 128, (before, after)
