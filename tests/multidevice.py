"""Runs a test module's `__main__` in a subprocess with N emulated CPU devices.

JAX fixes its device count when it initialises, so checks that need several devices run their
body in a fresh interpreter started with XLA_FLAGS=--xla_force_host_platform_device_count=N.
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def device_env(num_devices: int) -> dict[str, str]:
    """This process's environment for a child process that sees `num_devices` CPU devices."""
    return {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={num_devices}",
        "JAX_PLATFORMS": "cpu",
    }


def run_on_devices(module: str, num_devices: int, timeout: int = 600) -> str:
    """`python -m module` on `num_devices` CPU devices; asserts it exits 0; -> its stdout."""
    env = device_env(num_devices)
    proc = subprocess.run(
        [sys.executable, "-m", module], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout
