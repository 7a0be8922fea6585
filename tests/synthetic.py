"""Kept for the tests: the synthetic batch now lives in the package."""

from mrcnn_jax.data.synthetic import make_batch  # noqa: F401
