"""Training one model across several processes or machines with TensorFlow's own engine.

A job placed on N workers (``host:port`` each) runs the same training in N processes, one
per machine; each process builds :class:`tf.distribute.MultiWorkerMirroredStrategy` from
its :class:`Placement` (TensorFlow's ``TF_CONFIG``), and the strategy keeps the replicas'
variables identical by all-reducing every gradient. Worker 0 is the chief: only it writes
the run folder and records the run; the others train into a scratch folder.

Keras 3's ``Model.fit`` does not run under MultiWorkerMirroredStrategy (its data adapter
hands ``PerReplica`` values to ops that need tensors; keras-team/keras#20585), so
:func:`fit_loop` is the training loop for that case: the same optimizer, loss, class
weights, callbacks and batches as ``fit``, one ``strategy.run`` per batch. Every replica
takes a disjoint slice of each global batch and scales its loss by the global batch size,
so N workers compute exactly the update one process computes on the whole batch.

Nothing here imports TensorFlow at module level.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import tempfile
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from melcore import settings
from melcore.errors import ConfigError

__all__ = [
    "Placement",
    "multi_worker_strategy",
    "fit_loop",
    "predict_loop",
    "replica_rows",
    "is_multi_worker",
    "worker_run_dir",
    "check_distributable",
    "is_local_host",
    "communication_options",
]

_ADDRESS = re.compile(r"^[A-Za-z0-9_.\-\[\]:]+:(\d{1,5})$")


@dataclass(frozen=True)
class Placement:
    """Where the workers of one distributed job run, and which of them this process is.

    Parameters
    ----------
    workers : sequence of str
        ``host:port`` of every worker, the same list in the same order on every machine.
        The port is the one TensorFlow's collective ops listen on (one free port per worker).
    index : int
        This process's position in ``workers``; 0 is the chief.
    """

    workers: tuple[str, ...]
    index: int

    def __post_init__(self):
        workers = tuple(str(w).strip() for w in self.workers)
        if not workers:
            raise ConfigError("a placement needs at least one worker address (host:port)")
        for position, address in enumerate(workers, start=1):
            match = _ADDRESS.match(address)
            if not match or not 0 < int(match.group(1)) < 65536:
                raise ConfigError(
                    f"worker address {position} ({address!r}) is not host:port with a port 1-65535, "
                    "e.g. gpu1.example.org:2222"
                )
        repeated = sorted({a for a in workers if workers.count(a) > 1}, key=workers.index)
        if repeated:
            raise ConfigError(
                f"worker address {repeated[0]!r} is given {workers.count(repeated[0])} times "
                f"(addresses repeat: {', '.join(workers)}); give each worker its own host:port"
            )
        if (
            isinstance(self.index, bool)
            or not isinstance(self.index, (int, np.integer))
            or not 0 <= int(self.index) < len(workers)
        ):
            raise ConfigError(
                f"worker index must be 0..{len(workers) - 1} for {len(workers)} worker(s), got {self.index!r}"
            )
        object.__setattr__(self, "workers", workers)
        object.__setattr__(self, "index", int(self.index))

    @classmethod
    def parse(cls, workers: str | Sequence[str], index: int) -> "Placement":
        """From ``"host1:port,host2:port"`` (or a list of addresses) and this worker's index."""
        if isinstance(workers, str):
            workers = [w for w in workers.split(",") if w.strip()]
        return cls(tuple(workers), index)

    @classmethod
    def from_tf_config(cls, text: str) -> "Placement":
        """From a ``TF_CONFIG`` JSON string with a ``worker`` cluster and a ``worker`` task."""
        try:
            config = json.loads(text)
            workers = config["cluster"]["worker"]
            task = config["task"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"TF_CONFIG is not a worker cluster description ({exc}); expected "
                '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", '
                '"index": 0}}'
            ) from None
        if task.get("type") != "worker":
            raise ConfigError(
                f"TF_CONFIG task type {task.get('type')!r} is not supported; use 'worker' (worker 0 is the chief)"
            )
        return cls(tuple(workers), task.get("index", 0))

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> "Placement | None":
        """The placement ``TF_CONFIG`` describes, or None when it is unset or empty."""
        text = (os.environ if environ is None else environ).get("TF_CONFIG", "").strip()
        return cls.from_tf_config(text) if text else None

    @property
    def n_workers(self) -> int:
        return len(self.workers)

    @property
    def is_chief(self) -> bool:
        """Worker 0 writes the run; the others only train."""
        return self.index == 0

    def tf_config(self) -> dict:
        """The ``TF_CONFIG`` dictionary of this worker."""
        return {"cluster": {"worker": list(self.workers)}, "task": {"type": "worker", "index": self.index}}

    def to_dict(self) -> dict:
        return {"workers": list(self.workers), "index": self.index}

    @classmethod
    def from_dict(cls, data) -> "Placement":
        """From :meth:`to_dict`'s ``{"workers": [...], "index": i}`` (e.g. a job's config)."""
        if not isinstance(data, Mapping) or "workers" not in data:
            raise ConfigError(f"a placement is {{'workers': ['host:port', ...], 'index': i}}, got {data!r}")
        return cls(tuple(data["workers"]), data.get("index", 0))

    @property
    def host(self) -> str:
        """The host part of this worker's address (brackets of an IPv6 address removed)."""
        return self.workers[self.index].rsplit(":", 1)[0].strip("[]")

    def __str__(self) -> str:
        return f"worker {self.index} of {self.n_workers} ({', '.join(self.workers)})"


def multi_worker_strategy(placement: Placement):
    """A :class:`tf.distribute.MultiWorkerMirroredStrategy` for ``placement``.

    Sets ``TF_CONFIG`` in this process's environment first. Call it before TensorFlow runs any
    op in this process (TensorFlow fixes its collective setup at the first op); every worker
    of the placement must call it, and it returns once all of them have joined. Its collective
    ops time out after :func:`melcore.settings.collective_timeout` seconds when that is set
    (:func:`communication_options`).
    """
    options = communication_options(settings.collective_timeout())
    os.environ["TF_CONFIG"] = json.dumps(placement.tf_config())
    import tensorflow as tf

    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)


def communication_options(timeout_seconds: float | None):
    """``tf.distribute.experimental.CommunicationOptions`` whose collective ops time out after
    ``timeout_seconds`` (None: TensorFlow's default, no timeout). Creates no op."""
    import tensorflow as tf

    return tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout_seconds)


def worker_run_dir(placement: Placement | None, run_dir=None):
    """Where this worker writes its run: ``run_dir`` for the chief (or with no placement), else scratch.

    Every worker trains the whole run, but only the chief's folder is the run; the others
    write into a new temporary folder (``melreview-worker<I>-*`` in the system's temporary
    directory) that the caller removes afterwards.
    """
    if placement is None or placement.is_chief:
        return run_dir
    return tempfile.mkdtemp(prefix=f"melreview-worker{placement.index}-")


def is_local_host(host: str) -> bool:
    """Whether ``host`` names this machine: localhost, its host name, or an address of it."""
    host = host.strip().lower()
    names = {"localhost", "127.0.0.1", "::1", "0.0.0.0", socket.gethostname().lower(), socket.getfqdn().lower()}
    if host in names:
        return True
    try:
        wanted = {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
        mine = {str(info[4][0]) for info in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        return False
    return any(a.startswith("127.") or a == "::1" for a in wanted) or bool(wanted & mine)


def check_distributable(config) -> None:
    """ConfigError unless ``config`` (a TrainConfig) can train across workers: full mode only.

    Fast-head runs spend their time computing features, which shards across workers as
    ``features`` jobs (:mod:`melcore.shards`) instead.
    """
    mode = getattr(config, "mode", "full")
    if mode != "full":
        raise ConfigError(
            f"training across workers needs mode 'full', not {mode!r}; for fast-head runs, cache "
            "the features in shards (a 'features' job: jobs submit --kind features --shards N, or the "
            "Train page's feature cache) and train on one worker"
        )


def is_multi_worker(strategy) -> bool:
    """True for a strategy whose replicas span several processes (``Model.fit`` cannot drive it)."""
    if strategy is None:
        return False
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def replica_rows(n_rows: int, n_replicas: int, replica: int) -> slice:
    """Rows of a global batch of ``n_rows`` that replica ``replica`` of ``n_replicas`` trains on.

    Contiguous and disjoint; together they cover the batch; sizes differ by at most one
    (the first ``n_rows % n_replicas`` replicas take one more). A replica may get none.
    """
    if n_replicas < 1 or not 0 <= replica < n_replicas:
        raise ValueError(f"replica {replica} out of range for {n_replicas} replica(s)")
    base, extra = divmod(int(n_rows), int(n_replicas))
    start = replica * base + min(replica, extra)
    return slice(start, start + base + (1 if replica < extra else 0))


def _split_batch(batch) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    if not isinstance(batch, tuple) or len(batch) not in (2, 3):
        raise ConfigError(
            "training batches must be (images, targets) or (images, targets, sample_weights), "
            f"got {type(batch).__name__}"
        )
    x = np.asarray(batch[0], dtype=np.float32)
    y = np.asarray(batch[1], dtype=np.float32)
    w = np.asarray(batch[2], dtype=np.float32) if len(batch) == 3 else None
    return x, y, w


def _sample_weights(y: np.ndarray, w: np.ndarray | None, class_weight: Mapping | None) -> np.ndarray:
    weights = np.ones(len(y), dtype=np.float32) if w is None else w.astype(np.float32)
    if class_weight:
        keys = np.rint(y.reshape(len(y), -1)[:, 0]).astype(int)
        try:
            weights = weights * np.array([class_weight[int(k)] for k in keys], dtype=np.float32)
        except KeyError as exc:
            raise ConfigError(f"class_weight has no weight for class {exc.args[0]}") from None
    return weights


def fit_loop(
    model,
    batches,
    *,
    epochs: int,
    initial_epoch: int = 0,
    class_weight: Mapping | None = None,
    callbacks: Sequence = (),
    strategy=None,
) -> dict[str, list[float]]:
    """Train a compiled Keras model like ``model.fit(batches, ...)``, under any tf.distribute strategy.

    Parameters
    ----------
    model : keras.Model
        Compiled (``model.optimizer``, ``model.loss``) inside ``strategy.scope()``. The loss
        must be a :class:`keras.losses.Loss` (its unreduced ``call`` gives per-sample values).
    batches : keras.utils.PyDataset or sequence
        ``len(batches)`` batches per epoch; ``batches[i]`` is ``(x, y)`` or ``(x, y, w)``
        with ``x`` float32 ``(b, ...)`` and ``y`` ``(b,)``. ``on_epoch_begin`` /
        ``on_epoch_end`` are called as ``fit`` does, so epoch-dependent orders advance.
        Every worker reads every batch and keeps its replicas' rows.
    epochs, initial_epoch : int
        As ``fit``: epochs ``initial_epoch .. epochs - 1`` run.
    class_weight : dict {class: weight}, optional
        As ``fit``: multiplies each sample's loss by its class's weight.
    callbacks : sequence of keras.callbacks.Callback
        Called as ``fit`` calls them (train/epoch/batch begin and end, ``logs["loss"]`` the
        running mean of the epoch's batch losses); ``model.stop_training = True`` stops.
    strategy : tf.distribute.Strategy, optional
        Default: the current one (``tf.distribute.get_strategy()``).

    Returns
    -------
    dict
        ``{"loss": [mean loss per epoch run]}``, like ``History.history``.
    """
    import keras
    import tensorflow as tf

    if epochs < initial_epoch:
        raise ConfigError(f"epochs ({epochs}) must be at least initial_epoch ({initial_epoch})")
    if not isinstance(getattr(model, "loss", None), keras.losses.Loss):
        raise ConfigError(
            "fit_loop needs a model compiled with a keras.losses.Loss instance, e.g. keras.losses.BinaryCrossentropy()"
        )
    strategy = strategy or tf.distribute.get_strategy()
    n_replicas = int(strategy.num_replicas_in_sync)
    loss_fn, optimizer = model.loss, model.optimizer

    def replica_step(x, y, w, global_rows):
        with tf.GradientTape() as tape:
            p = model(x, training=True)
            per_sample = loss_fn.call(tf.reshape(y, tf.shape(p)), p)
            per_sample = tf.reshape(per_sample, [-1])
            loss = tf.reduce_sum(per_sample * w) / tf.cast(global_rows, per_sample.dtype)
            if model.losses:
                loss += tf.add_n(model.losses) / n_replicas
        variables = model.trainable_variables
        gradients = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(gradients, variables))
        return loss

    @tf.function(reduce_retracing=True)
    def train_step(x, y, w, global_rows):
        per_replica = strategy.run(replica_step, args=(x, y, w, global_rows))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    def distribute(array: np.ndarray):
        def value(context):
            return tf.constant(array[replica_rows(len(array), n_replicas, context.replica_id_in_sync_group)])

        return strategy.experimental_distribute_values_from_function(value)

    callback_list = keras.callbacks.CallbackList(
        list(callbacks), model=model, epochs=epochs, steps=len(batches), verbose=0
    )
    model.stop_training = False
    history: dict[str, list[float]] = {"loss": []}
    hooks = hasattr(batches, "on_epoch_begin"), hasattr(batches, "on_epoch_end")
    callback_list.on_train_begin()
    for epoch in range(initial_epoch, epochs):
        if hooks[0]:
            batches.on_epoch_begin()
        callback_list.on_epoch_begin(epoch)
        total, steps = 0.0, 0
        for step in range(len(batches)):
            callback_list.on_train_batch_begin(step)
            x, y, w = _split_batch(batches[step])
            w = _sample_weights(y, w, class_weight)
            loss = train_step(distribute(x), distribute(y), distribute(w), tf.constant(len(x), tf.int32))
            total, steps = total + float(loss), steps + 1
            callback_list.on_train_batch_end(step, {"loss": total / steps})
            if model.stop_training:
                break
        if hooks[1]:
            batches.on_epoch_end()
        logs = {"loss": total / steps if steps else math.nan}
        history["loss"].append(logs["loss"])
        callback_list.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    callback_list.on_train_end()
    return history


def predict_loop(model, batches) -> np.ndarray:
    """``model(x, training=False)`` over every batch, concatenated: float32 ``(n, ...)``.

    Works where ``model.predict`` does not (under MultiWorkerMirroredStrategy every worker
    holds the same weights, so each scores locally). ``batches[i]`` is ``x`` or a tuple
    whose first item is ``x``.
    """
    outputs: list[np.ndarray] = []
    for i in range(len(batches)):
        batch: Any = batches[i]
        x = batch[0] if isinstance(batch, tuple) else batch
        outputs.append(np.asarray(model(np.asarray(x, dtype=np.float32), training=False)))
    if not outputs:
        raise ConfigError("no batches to score")
    return np.concatenate(outputs, axis=0)
