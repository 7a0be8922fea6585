"""Data: TFDS builders (`shapes`, `coco_folder`), annotation repair, and the fixed-shape tf.data
input pipeline that feeds JAX (`pipeline.train_batches`, `pipeline.eval_batches`).

TensorFlow only reads and decodes data here. Importing this package hides every GPU from TF before
its runtime starts, so TF never allocates accelerator memory that JAX needs (TF grabs all of a GPU's
memory on first use by default).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402


def _hide_gpus_from_tf() -> None:
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # The caller's TF runtime already started: its devices are its choice.
        pass


_hide_gpus_from_tf()
