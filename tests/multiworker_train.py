"""``python -m melcore ARGS`` with dropout switched off, for the training-across-workers test.

python tests/multiworker_train.py train --csv ... [--worker-hosts H:P,H:P --worker-index I]

Dropout draws its masks per replica, so a run on two workers and the same run in one
process differ by their dropout noise alone; with dropout off every other difference (data
order, gradients, optimizer steps, selection, validation, which worker writes the run)
shows up as a mismatch of the recorded metrics (tests/test_distributed.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402  (no TensorFlow op runs on import, so the strategy can still be set up)


def _no_dropout(self, inputs, training=False):
    return inputs


if __name__ == "__main__":
    keras.layers.Dropout.call = _no_dropout
    from melcore.__main__ import main

    raise SystemExit(main(sys.argv[1:]))
