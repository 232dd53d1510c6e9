"""The one module that touches private attributes of Lightning (and, when needed, of argparse and
jsonargparse).

Each function or class here wraps one upstream behaviour that has no public interface, with a
comment naming it (and the Lightning issue, where there is one); tests/test_compat.py pins each on
a tiny real run, so an upgrade that changes the behaviour fails there, by name, instead of
silently changing training. Every other module uses these names, never the private attributes
(tests/test_compat.py checks that too).
"""

from __future__ import annotations

from datetime import timedelta

import lightning as L
from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint, WeightAveraging
from torch.optim.swa_utils import AveragedModel

__all__ = [
    "ModelCheckpointAfterWrite",
    "attached_trainer",
    "averaged_model",
    "cluster_environment",
    "load_pending_loader_state",
    "set_step_and_time_triggers",
    "swap_averaged_weights",
]


# ---------------------------------------------------------------------------- Lightning: ModelCheckpoint
class ModelCheckpointAfterWrite(ModelCheckpoint):
    """``ModelCheckpoint`` that calls :meth:`after_write` after each file it writes."""

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        # ModelCheckpoint._save_checkpoint(trainer, filepath) is the one method every write of the
        # callback goes through (top-k, last, every n steps, time interval): trainer.save_checkpoint,
        # then its bookkeeping (last saved step and path, the loggers' after_save_checkpoint). The
        # public trainer.save_checkpoint would skip that bookkeeping; no public hook runs after it.
        super()._save_checkpoint(trainer, filepath)
        self.after_write(trainer, filepath)

    def after_write(self, trainer: L.Trainer, filepath: str) -> None:
        """Called on every rank after ``filepath`` was written (through the trainer's checkpoint IO)."""


def set_step_and_time_triggers(
    callback: ModelCheckpoint, every_n_steps: int, interval: timedelta | None
) -> None:
    """Make ``callback`` save every ``every_n_steps`` optimizer steps and every ``interval`` of
    training time, whichever comes first (0 / ``None``: that trigger off)."""
    # ModelCheckpoint.__init__ refuses every_n_train_steps together with train_time_interval
    # ("should be mutually exclusive"), but its on_train_batch_end checks both, from these two
    # attributes, and saves when either fires (the time decision broadcast from rank 0).
    callback._every_n_train_steps = every_n_steps
    callback._train_time_interval = interval


# ---------------------------------------------------------------------------- Lightning: fit loop
def load_pending_loader_state(trainer: L.Trainer) -> bool:
    """Load the checkpoint's data-loader state that the fit loop read but did not apply, and
    recreate the batch iterator from it; True when a pending state was loaded."""
    # Lightning issue #20550: FitLoop.setup_data restores a StatefulDataLoader's state, but when
    # configure_optimizers reads trainer.estimated_stepping_batches the loader is set up before the
    # checkpoint is read, and the state stays in FitLoop._combined_loader_states_to_load. Its own
    # FitLoop._load_combined_loader_states applies it (only when restarting, and empties the list);
    # iter(FitLoop._data_fetcher) then restarts the fetcher from the restored position.
    loop = trainer.fit_loop
    if not getattr(loop, "_combined_loader_states_to_load", None) or loop._data_fetcher is None:
        return False
    loop._load_combined_loader_states()
    if loop._combined_loader_states_to_load:  # not restarting: left as it was
        return False
    iter(loop._data_fetcher)
    return True


# ---------------------------------------------------------------------------- Lightning: Trainer, module
def cluster_environment(trainer: L.Trainer) -> ClusterEnvironment | None:
    """The cluster environment the trainer runs in (``SLURMEnvironment`` under SLURM, or the one
    passed in ``plugins``)."""
    # Only parallel strategies expose it (strategy.cluster_environment); a single-device run's is in
    # Trainer._accelerator_connector.cluster_environment, where Lightning's own SIGUSR1 requeue
    # (_SignalConnector.register_signal_handlers) reads it too.
    return getattr(trainer._accelerator_connector, "cluster_environment", None)


def attached_trainer(module: L.LightningModule) -> L.Trainer | None:
    """The trainer ``module`` is attached to, ``None`` outside ``fit`` / ``validate`` (a module
    built or called on its own)."""
    # LightningModule.trainer raises RuntimeError when no trainer is attached; the attribute behind
    # it, LightningModule._trainer, is None then (Lightning's own current_epoch / global_step test it).
    return module._trainer


# ---------------------------------------------------------------------------- Lightning: WeightAveraging
def averaged_model(callback: WeightAveraging) -> AveragedModel | None:
    """The callback's ``AveragedModel`` (its ``module`` holds the averaged weights), ``None``
    before ``fit`` set it up."""
    # WeightAveraging keeps it in _average_model, created in setup("fit"); there is no accessor.
    return callback._average_model


def swap_averaged_weights(callback: WeightAveraging, pl_module: L.LightningModule) -> None:
    """Exchange the module's weights and buffers with the averaged ones, in place (twice: back)."""
    # WeightAveraging._swap_models(pl_module), what its on_validation_epoch_start / _end call.
    callback._swap_models(pl_module)
