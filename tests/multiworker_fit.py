"""One worker of the two-process training test (tests/test_distributed.py).

python tests/multiworker_fit.py OUT.npz [WORKERS INDEX]: trains the tiny model of
``build`` on ``Batches`` with melcore.distributed.fit_loop, under
MultiWorkerMirroredStrategy when WORKERS (host:port,host:port) is given, and writes the
final weights and loss history to OUT.npz (the chief only, as a run would).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


import keras  # noqa: E402  (no TensorFlow op runs on import, so the strategy can still be set up)


class Batches(keras.utils.PyDataset):
    """16 batches of 8 random 12x12 RGB images per epoch, in an order that changes each epoch.

    Like melcore.pipeline.ImageBatches, only an end that closes a begun epoch moves on (Keras
    also calls on_epoch_end once when fit starts).
    """

    def __init__(self, n: int = 128, batch_size: int = 8):
        super().__init__(workers=1)
        self.started = False
        rng = np.random.default_rng(0)
        self.x = rng.uniform(0, 255, size=(n, 12, 12, 3)).astype("float32")
        self.y = (self.x[:, :6, :, 0].mean(axis=(1, 2)) > 127).astype("float32")
        self.batch_size, self.epoch, self.order = batch_size, 0, np.arange(n)

    def __len__(self):
        return len(self.x) // self.batch_size

    def __getitem__(self, i):
        rows = self.order[i * self.batch_size : (i + 1) * self.batch_size]
        return self.x[rows], self.y[rows]

    def on_epoch_begin(self):
        self.started = True

    def on_epoch_end(self):
        if not self.started:
            return
        self.started = False
        self.epoch += 1
        self.order = np.random.default_rng(self.epoch).permutation(len(self.x))


def build():
    import keras

    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [
            keras.Input((12, 12, 3)),
            keras.layers.Rescaling(1 / 255.0),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=keras.losses.BinaryCrossentropy())
    return model


def main(argv):
    from melcore import distributed

    out = Path(argv[0])
    strategy = None
    placement = None
    if len(argv) > 1:
        placement = distributed.Placement.parse(argv[1], int(argv[2]))
        strategy = distributed.multi_worker_strategy(placement)
    import contextlib

    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        model = build()
    history = distributed.fit_loop(model, Batches(), epochs=3, class_weight={0: 1.0, 1: 2.0}, strategy=strategy)
    if placement is None or placement.is_chief:
        weights = model.get_weights()
        np.savez(out, loss=np.array(history["loss"]), n=len(weights), **{f"w{i}": w for i, w in enumerate(weights)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
