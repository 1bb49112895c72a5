"""The optimizer and learning-rate schedule of a training stage, from the model's :class:`~melcore.training.recipes.Recipe`.

::

    optimizer = make_optimizer("efficientnet-b3", steps_per_epoch=40, epochs=3)          # the recipe's
    optimizer = make_optimizer("cnn-bn", 3e-4, 40, 2, optimizer="adam", schedule="constant")

Keras is imported when an optimizer is made, not when this module is.
"""

from __future__ import annotations

from melcore.errors import ConfigError
from melcore.registry import OPTIMIZERS, SCHEDULES, ModelSpec
from melcore.training.recipes import Recipe, recipe_for

__all__ = ["make_optimizer"]


def make_optimizer(
    model: str | ModelSpec | Recipe,
    lr: float | None = None,
    steps_per_epoch: int = 1,
    epochs: int = 1,
    weight_decay: float | None = None,
    *,
    optimizer: str | None = None,
    schedule: str | None = None,
    momentum: float = 0.9,
    decay_rate: float = 0.9,
):
    """The optimizer with its learning-rate schedule; every None is the model's recipe value.

    Parameters
    ----------
    model : str, ModelSpec or Recipe
        A registry name or spec (its :func:`~melcore.training.recipes.recipe_for` gives the
        defaults), or a recipe.
    lr : float or None
        Initial learning rate; None = ``recipe.learning_rate``.
    steps_per_epoch, epochs : int
        Length of the run the schedule spans (batches, epochs).
    weight_decay : float or None
        Decoupled weight decay; None = ``recipe.weight_decay``; 0 = none.
    optimizer : str or None
        ``"sgd"`` (Nesterov momentum), ``"adam"`` or ``"adamw"``; None = the recipe's.
    schedule : str or None
        ``"constant"``; ``"exponential"`` (LR x ``decay_rate`` per epoch, staircase);
        ``"cosine"`` (cosine decay to 1% over ``epochs``); None = the recipe's.
    momentum : float
        SGD momentum.
    decay_rate : float
        Per-epoch factor of the exponential schedule.

    Returns
    -------
    keras.optimizers.Optimizer
        A fresh optimizer (one per ``compile``).

    Raises
    ------
    ConfigError
        Unknown model, optimizer or schedule; a learning rate that is not positive; a negative weight decay.
    """
    import keras

    recipe = model if isinstance(model, Recipe) else recipe_for(model.name if isinstance(model, ModelSpec) else model)
    lr = recipe.learning_rate if lr is None else float(lr)
    weight_decay = recipe.weight_decay if weight_decay is None else float(weight_decay)
    optimizer = (optimizer or recipe.optimizer).lower()
    schedule = (schedule or recipe.schedule).lower()
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {optimizer!r}; valid optimizers: {', '.join(OPTIMIZERS)}")
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown learning-rate schedule {schedule!r}; valid schedules: {', '.join(SCHEDULES)}")
    if not lr > 0:
        raise ConfigError(f"learning rate must be positive, got {lr}")
    if weight_decay < 0:
        raise ConfigError(f"weight decay must be >= 0, got {weight_decay}")
    steps_per_epoch, epochs = max(1, int(steps_per_epoch)), max(1, int(epochs))
    if schedule == "exponential":
        rate = keras.optimizers.schedules.ExponentialDecay(
            lr, decay_steps=steps_per_epoch, decay_rate=decay_rate, staircase=True
        )
    elif schedule == "cosine":
        rate = keras.optimizers.schedules.CosineDecay(lr, decay_steps=steps_per_epoch * epochs, alpha=0.01)
    else:
        rate = lr
    decay = weight_decay or None
    if optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=rate, momentum=momentum, nesterov=True, weight_decay=decay)
    if optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=rate, weight_decay=decay)
    return keras.optimizers.AdamW(learning_rate=rate, weight_decay=weight_decay)
