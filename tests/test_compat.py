"""Pins of the upstream behaviour :mod:`qgtrain.compat` relies on, one test per function, each on a
tiny real Trainer run; and the check that no other module of ``qgtrain`` touches the private
attributes it wraps. An upgrade of Lightning that changes one of them fails here, by name."""

from __future__ import annotations

import ast
import io
import tokenize
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, ModelCheckpoint
from lightning.pytorch.loops import _FitLoop
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from qgtrain.checkpoints import StepCheckpoint
from qgtrain.compat import (
    ModelCheckpointAfterWrite,
    attached_trainer,
    averaged_model,
    cluster_environment,
    load_pending_loader_state,
    set_step_and_time_triggers,
    swap_averaged_weights,
)
from qgtrain.training import quiet_trainer
from tests.helpers import REPO

EXAMPLES = 8


class Numbered(L.LightningModule):
    """A linear model over the examples 0..7, one per batch, in order; records which it trained on.
    ``configure_optimizers`` reads ``trainer.estimated_stepping_batches``, as AdversarialTraining does
    for its learning-rate schedule (what sets up the loader before a checkpoint is read)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(1, 1)
        self.seen: list[int] = []
        self.trainer_in_step: L.Trainer | None = None

    def train_dataloader(self) -> StatefulDataLoader:
        data = TensorDataset(torch.arange(EXAMPLES, dtype=torch.float32).unsqueeze(1))
        return StatefulDataLoader(data, batch_size=1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (x,) = batch
        self.seen.append(int(x.item()))
        self.trainer_in_step = attached_trainer(self)
        return (self.layer(x) - 1).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        assert self.trainer.estimated_stepping_batches >= 1
        return torch.optim.SGD(self.parameters(), lr=0.1)


class StoppedError(RuntimeError):
    pass


class SaveThenStop(Callback):
    """Write ``path`` at the end of batch ``at`` (as a step checkpoint does), then stop the run."""

    def __init__(self, path: Path, at: int) -> None:
        self.path, self.at = path, at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.at:
            trainer.save_checkpoint(self.path)
            raise StoppedError


class LoadPending(Callback):
    def __init__(self) -> None:
        self.loaded: bool | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.loaded = load_pending_loader_state(trainer)


class Writes(ModelCheckpointAfterWrite):
    """Records ``(global step, path, the step the file on disk holds)`` at each ``after_write``."""

    def __init__(self, dirpath: Path, **kwargs) -> None:
        super().__init__(dirpath=dirpath, filename="step", monitor=None, save_top_k=1, save_last=False,
                         enable_version_counter=False, **kwargs)  # fmt: skip
        self.writes: list[tuple[int, str, int]] = []

    def after_write(self, trainer: L.Trainer, filepath: str) -> None:
        on_disk = torch.load(filepath, map_location="cpu", weights_only=True)["global_step"]
        self.writes.append((trainer.global_step, filepath, on_disk))


def test_after_write_follows_every_write_of_model_checkpoint(tmp_path: Path) -> None:
    """``ModelCheckpoint._save_checkpoint`` is the one path of its writes: ``after_write`` runs after
    each, with the file complete on disk and the callback's bookkeeping (its last saved step) done."""
    assert callable(getattr(ModelCheckpoint, "_save_checkpoint", None))
    writes = Writes(tmp_path, every_n_train_steps=3)
    quiet_trainer(max_epochs=1, enable_checkpointing=True, callbacks=[writes]).fit(Numbered())
    path = str(tmp_path / "step.ckpt")
    assert writes.writes == [(3, path, 3), (6, path, 6)]
    assert writes.best_model_path == path and writes._last_global_step_saved == 6


def test_step_and_time_triggers_work_together(tmp_path: Path) -> None:
    """Lightning refuses the two triggers together in the constructor, but its batch-end check reads
    both: set through :func:`set_step_and_time_triggers`, either one writes."""
    with pytest.raises(MisconfigurationException, match="mutually exclusive"):
        ModelCheckpoint(every_n_train_steps=2, train_time_interval=timedelta(minutes=1))
    steps_written = {}
    for name, interval in [("steps only", None), ("a long interval", timedelta(hours=1)),
                           ("an interval shorter than a step", timedelta(microseconds=1))]:  # fmt: skip
        writes = Writes(tmp_path / name, every_n_epochs=0)
        set_step_and_time_triggers(writes, 3, interval)
        quiet_trainer(max_epochs=1, enable_checkpointing=True, callbacks=[writes]).fit(Numbered())
        steps_written[name] = [step for step, _, _ in writes.writes]
    assert steps_written == {
        "steps only": [3, 6],
        "a long interval": [3, 6],
        "an interval shorter than a step": list(range(1, EXAMPLES + 1)),
    }


def test_step_checkpoint_state_key_is_the_one_written_checkpoints_hold(tmp_path: Path) -> None:
    """Not a private use (the key is built in the open), but the same string as Lightning's
    ``Callback._generate_state_key`` builds, under which existing ``step.ckpt`` files hold the state."""
    step = StepCheckpoint(tmp_path, every_n_steps=2, every_minutes=5.0)
    assert step.state_key == "StepCheckpoint{'name': 'step'}" == Callback._generate_state_key(step, name="step")


@pytest.mark.parametrize("load", [True, False], ids=["loaded", "control: Lightning alone"])
def test_pending_loader_state_resumes_inside_the_epoch(load: bool, tmp_path: Path) -> None:
    """Lightning issue #20550: resumed from a checkpoint written after batch 2, the fit loop leaves
    the loader's state pending (``configure_optimizers`` read ``estimated_stepping_batches``);
    loaded, the run continues at example 3. The control, without it, trains the five batches left
    from the loader's first (examples 0-4, 3-7 never): when Lightning fixes the issue the control
    fails, and the workaround can go."""
    assert {"_combined_loader_states_to_load", "_data_fetcher"} <= set(vars(_FitLoop(quiet_trainer())))
    assert callable(getattr(_FitLoop, "_load_combined_loader_states", None))
    path = tmp_path / "mid.ckpt"
    first = Numbered()
    with pytest.raises(StoppedError):
        quiet_trainer(max_epochs=1, callbacks=[SaveThenStop(path, at=2)]).fit(first)
    assert first.seen == [0, 1, 2]
    resumed, pending = Numbered(), LoadPending()
    callbacks = [pending] if load else []
    quiet_trainer(max_epochs=1, callbacks=callbacks).fit(resumed, ckpt_path=path)
    assert resumed.seen == ([3, 4, 5, 6, 7] if load else [0, 1, 2, 3, 4])
    assert pending.loaded is (True if load else None)


def test_pending_loader_state_is_left_alone_on_a_fresh_run() -> None:
    pending = LoadPending()
    module = Numbered()
    quiet_trainer(max_epochs=1, callbacks=[pending]).fit(module)
    assert pending.loaded is False and module.seen == list(range(EXAMPLES))


def test_cluster_environment_is_the_one_the_trainer_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    """A single-device strategy does not expose it (the public route); the trainer still chose one:
    Lightning's own, one passed in ``plugins``, or SLURM's when the job runs under SLURM."""
    trainer = quiet_trainer()
    assert not hasattr(trainer.strategy, "cluster_environment")
    assert isinstance(cluster_environment(trainer), LightningEnvironment)
    passed = SLURMEnvironment(auto_requeue=False)
    assert cluster_environment(quiet_trainer(plugins=[passed])) is passed
    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "7",
                       "SLURM_NODELIST": "node1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                       "SLURM_NODEID": "0"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    detected = cluster_environment(quiet_trainer())
    assert isinstance(detected, SLURMEnvironment) and detected.auto_requeue


def test_attached_trainer_is_none_until_fit_attaches_one() -> None:
    module = Numbered()
    assert attached_trainer(module) is None
    with pytest.raises(RuntimeError, match="not attached to a `Trainer`"):
        module.trainer  # noqa: B018  (what the public property does instead)
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(module)
    assert module.trainer_in_step is trainer


class SwapOnce(Callback):
    """After batch 3 (placed after the averaging callback): the weights before, after one swap and
    after a second one, and the average's at each point."""

    def __init__(self, averaging: EMAWeightAveraging) -> None:
        self.averaging = averaging
        self.states: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(self, pl_module: L.LightningModule) -> None:
        average = averaged_model(self.averaging)
        assert average is not None
        self.states.append((pl_module.layer.weight.detach().clone(), average.module.layer.weight.detach().clone()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 3:
            self.record(pl_module)
            swap_averaged_weights(self.averaging, pl_module)
            self.record(pl_module)
            swap_averaged_weights(self.averaging, pl_module)
            self.record(pl_module)


def test_average_and_swap_of_weight_averaging() -> None:
    """The ``AveragedModel`` exists from ``setup("fit")`` on and holds the average (not the trained
    weights); a swap exchanges them in place, a second swaps back."""
    averaging = EMAWeightAveraging(decay=0.5)
    assert averaged_model(averaging) is None
    swap = SwapOnce(averaging)
    quiet_trainer(max_epochs=1, callbacks=[averaging, swap]).fit(Numbered())
    (trained, average), (swapped_in, swapped_out), back = swap.states
    assert not torch.equal(trained, average)
    assert torch.equal(swapped_in, average) and torch.equal(swapped_out, trained)
    assert torch.equal(back[0], trained) and torch.equal(back[1], average)


# ------------------------------------------------------------------------------ no private use elsewhere
WRAPPED = frozenset({
    "_save_checkpoint",  # ModelCheckpoint
    "_every_n_train_steps",  # ModelCheckpoint
    "_train_time_interval",  # ModelCheckpoint
    "_combined_loader_states_to_load",  # _FitLoop
    "_data_fetcher",  # _FitLoop
    "_load_combined_loader_states",  # _FitLoop
    "_accelerator_connector",  # Trainer
    "_trainer",  # LightningModule
    "_average_model",  # WeightAveraging
    "_swap_models",  # WeightAveraging
})  # fmt: skip
"""The Lightning private attributes :mod:`qgtrain.compat` wraps."""
REPLACED = frozenset({"_generate_state_key"})  # Callback: StepCheckpoint.state_key builds its key itself
PRIVATE_NAMES = WRAPPED | REPLACED
"""What no module of qgtrain other than :mod:`qgtrain.compat` may name."""


def private_uses(source: str) -> list[tuple[int, str]]:
    """``(line, name)`` for each name of :data:`PRIVATE_NAMES` in ``source``: as an identifier
    (``trainer._accelerator_connector``, ``def _save_checkpoint``) or as a string literal
    (``getattr(loop, "_data_fetcher")``); comments and docstrings that mention one do not count."""
    found = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.NAME and token.string in PRIVATE_NAMES:
            found.append((token.start[0], token.string))
        elif token.type == tokenize.STRING:
            try:
                value = ast.literal_eval(token.string)
            except (ValueError, SyntaxError):  # an f-string
                continue
            if value in PRIVATE_NAMES:
                found.append((token.start[0], value))
    return found


def test_the_scan_finds_each_kind_of_use() -> None:
    """The control of the next test: each way of naming a private attribute is found."""
    source = (
        'def _save_checkpoint(self, trainer, filepath):\n'
        '    """Mentions _data_fetcher in a docstring."""  # and _swap_models in a comment\n'
        '    env = trainer._accelerator_connector.cluster_environment\n'
        '    module = trainer.lightning_module if self._trainer is None else None\n'
        '    return getattr(trainer.fit_loop, "_data_fetcher", None)\n'
    )  # fmt: skip
    assert private_uses(source) == [
        (1, "_save_checkpoint"), (3, "_accelerator_connector"), (4, "_trainer"), (5, "_data_fetcher"),
    ]  # fmt: skip


def test_only_compat_touches_lightning_private_attributes() -> None:
    package = REPO / "qgtrain"
    compat = package / "compat.py"
    assert {name for _, name in private_uses(compat.read_text())} == WRAPPED  # each wrapped there
    uses = {
        f"{path.relative_to(REPO)}:{line}": name
        for path in sorted(package.rglob("*.py"))
        if path != compat
        for line, name in private_uses(path.read_text())
    }
    assert uses == {}, f"use qgtrain.compat instead: {uses}"
