"""The process a run trains in: TensorFlow op determinism for the run, and the device in words.

Reproducibility: the same config, cohort and seed on the same machine give the same weights,
predictions and metrics: seeds are set before the model is built, the data order and every
augmentation draw are functions of (seed, epoch, position) (:mod:`melcore.pipeline`), and
``config.deterministic`` (default True) turns on ``tf.config.experimental.enable_op_determinism()``
for the process during a fit and turns it off again afterwards (TensorFlow has no public switch to
turn it off; the internal one is used, see :func:`op_determinism`). On GPUs this may slow some ops.
"""

from __future__ import annotations

import contextlib
import os
import platform

from melcore.distributed import Placement, is_multi_worker

__all__ = ["op_determinism", "device_description"]


@contextlib.contextmanager
def op_determinism(enabled: bool):
    """TF op determinism on while the block runs (when ``enabled``), restored afterwards; yields whether on.

    TensorFlow only offers ``enable_op_determinism`` publicly; the matching internal
    ``disable_op_determinism`` restores the previous state so other work in the same
    process (the app, a worker's next job) is not slowed down after ``fit``.
    """
    if not enabled:
        yield False
        return
    import tensorflow as tf

    try:
        from tensorflow.python.framework import config as tf_config

        before = bool(tf_config.is_op_determinism_enabled())
    except Exception:  # noqa: BLE001 - internal API moved: leave determinism on
        tf_config, before = None, None
    tf.config.experimental.enable_op_determinism()
    try:
        yield True
    finally:
        if tf_config is not None and before is False:
            try:
                tf_config.disable_op_determinism()
            except Exception:  # noqa: BLE001
                pass


def device_description(strategy) -> tuple[str, int]:
    """The device a run trains on in words (``metrics["device"]``), and its number of replicas."""
    import tensorflow as tf

    if is_multi_worker(strategy):
        placement = Placement.from_environment()
        where = f" on {placement.n_workers} workers ({', '.join(placement.workers)})" if placement else ""
        return (
            f"MultiWorkerMirroredStrategy, {int(strategy.num_replicas_in_sync)} replicas{where}",
            int(strategy.num_replicas_in_sync),
        )
    if strategy is not None:
        devices = list(getattr(strategy.extended, "worker_devices", ()) or ())
        return (
            f"{type(strategy).__name__} over {', '.join(devices)}" if devices else type(strategy).__name__,
            int(strategy.num_replicas_in_sync),
        )
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        try:
            details = tf.config.experimental.get_device_details(tf.config.list_physical_devices("GPU")[0])
            label = details.get("device_name") or ""
        except Exception:  # noqa: BLE001
            label = ""
        return (f"{gpus[0].name}" + (f" ({label})" if label else "")), 1
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)", 1
