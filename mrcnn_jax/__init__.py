"""Mask R-CNN as a pure, functional JAX/Flax library."""

__version__ = "0.1.0"
