"""train.py's console: our lines start on their own line under a progress bar; other libraries'
start-up lines and deprecations are hidden unless --verbose."""

from __future__ import annotations

import io
import logging
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import lightning as L
import pytest
import torch
from tqdm import tqdm

from qgtrain import console
from qgtrain.attacks import PGD
from qgtrain.models import TinyCNN
from qgtrain.training import AdversarialTraining
from tests.helpers import small_mnist_datamodule


def screen(written: str) -> list[str]:
    """The lines a terminal shows for ``written``: ``\\r`` returns to the line's start, text overwrites."""
    lines: list[list[str]] = [[]]
    column = 0
    for part in re.split(r"(\r|\n)", written):
        if part == "\r":
            column = 0
        elif part == "\n":
            lines.append([])
            column = 0
        else:
            line = lines[-1]
            line[column : column + len(part)] = list(part)
            column += len(part)
    return [text for text in ("".join(line).rstrip() for line in lines) if text]


@contextmanager
def terminal() -> Iterator[io.StringIO]:
    """One stream for standard output and error, as a terminal mixes them."""
    stream = io.StringIO()
    with redirect_stdout(stream), redirect_stderr(stream):
        yield stream


def log_under_a_bar(make_handler: Callable[[], logging.Handler]) -> list[str]:
    logger = logging.getLogger("qgtrain.test_console")
    logger.propagate, logger.level = False, logging.INFO
    with terminal() as stream:
        handler = make_handler()
        logger.addHandler(handler)
        bar = tqdm(total=10, desc="Epoch 0", file=sys.stdout, mininterval=0)
        try:
            bar.update(3)
            logger.info("epoch 0 robustness: worst=1.0%")
            bar.update(1)
        finally:
            bar.close()
            logger.removeHandler(handler)
    return screen(stream.getvalue())


def test_a_logged_line_starts_on_its_own_line_under_a_progress_bar() -> None:
    """The record is a whole line and the bar goes on below it. Control: logging's plain stream handler
    (what basicConfig installs) continues the bar's line."""
    shown = log_under_a_bar(console.LineHandler)
    assert "epoch 0 robustness: worst=1.0%" in shown, shown
    assert shown[-1].startswith("Epoch 0:  40%"), shown
    plain = log_under_a_bar(lambda: logging.StreamHandler(sys.stderr))
    assert "epoch 0 robustness: worst=1.0%" not in plain
    assert any(line.startswith("Epoch 0:") and line.endswith("]epoch 0 robustness: worst=1.0%") for line in plain)


def _module() -> AdversarialTraining:
    return AdversarialTraining(
        TinyCNN(dataset="mnist", width=4),
        PGD(eps=0.3, alpha=0.1, steps=1),
        val_attack=None,
        eps_warmup_epochs=0.0,
    )


class StopFitError(RuntimeError):
    pass


class InterruptAt(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 1:
            raise StopFitError


@pytest.mark.parametrize("end_bars", [True, False])
def test_the_line_after_an_interrupted_fit_comes_below_the_bar(end_bars: bool, data_root: Path) -> None:
    """After fit stopped inside an epoch, ``write_after_fit`` leaves the bar where it stopped and
    writes below it, last. Control: the same line without closing the bars is drawn over again by
    the bar Lightning left open, so the bar is the last line."""
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
        inference_mode=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[InterruptAt()],
    )  # fmt: skip
    torch.manual_seed(0)
    line = "train.py: interrupted by Ctrl-C at epoch 0, step 2"
    with terminal() as stream:
        with pytest.raises(StopFitError):
            trainer.fit(_module(), datamodule=small_mnist_datamodule(data_root, train_subset=64))
        if end_bars:
            console.write_after_fit(trainer, line)
        else:
            console.write_line(line)
    shown = screen(stream.getvalue())
    if end_bars:
        assert shown[-1] == line and shown[-2].startswith("Epoch 0: "), shown
    else:
        assert shown[-1].startswith("Epoch 0: ") and shown[-2] == line, shown


def lightning_lines(verbose: bool) -> list[str]:
    """What Lightning's start-up logs when a Trainer is built, after ``quiet_other_libraries``."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    watched = logging.getLogger(console.LIGHTNING_INFO_LOGGERS[0])
    watched.addHandler(handler)
    try:
        console.quiet_other_libraries(verbose=verbose)
        L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    finally:
        watched.removeHandler(handler)
        console.quiet_other_libraries(verbose=True)  # as imported, for the tests after this one
    return records


def test_lightnings_start_up_lines_show_only_with_verbose() -> None:
    assert not any(line.startswith("GPU available") for line in lightning_lines(verbose=False))
    assert any(line.startswith("GPU available") for line in lightning_lines(verbose=True))  # control


def _library_deprecations() -> list[str]:
    """Trigger the two deprecations where they arise: torchdata's StatefulDataLoader calling
    ``torch.set_vital``, and Lightning's tree_flatten building a ``LeafSpec``."""
    from lightning.pytorch.utilities._pytree import _tree_flatten
    from torchdata.stateful_dataloader import StatefulDataLoader

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.quiet_other_libraries(verbose=False)
        next(iter(StatefulDataLoader(torch.utils.data.TensorDataset(torch.zeros(2)), batch_size=1)))
        _tree_flatten(torch.zeros(1))
        warnings.warn("qgtrain's own warning", UserWarning, stacklevel=1)
    return [str(w.message) for w in caught]


def test_library_deprecations_are_hidden_by_message_and_module_only() -> None:
    """Pins the upstream sources: if torchdata or Lightning move them, the control half fails."""
    shown = _library_deprecations()
    assert shown == ["qgtrain's own warning"], shown
    with warnings.catch_warnings(record=True) as caught:  # control: the same calls, no filters
        warnings.simplefilter("always")
        from lightning.pytorch.utilities._pytree import _tree_flatten
        from torchdata.stateful_dataloader import StatefulDataLoader

        next(iter(StatefulDataLoader(torch.utils.data.TensorDataset(torch.zeros(2)), batch_size=1)))
        _tree_flatten(torch.zeros(1))
    raised = [str(w.message) for w in caught]
    for message, _ in console.LIBRARY_DEPRECATIONS:
        assert any(re.match(message, text) for text in raised), (message, raised)


def test_an_existing_checkpoint_folder_is_expected_only_for_the_resumed_run(tmp_path: Path) -> None:
    resumed, other = tmp_path / "run (1)", tmp_path / "other"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.expect_existing_checkpoints(str(resumed))
        for folder in (resumed, other):
            warnings.warn(f"Checkpoint directory {folder} exists and is not empty.", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == [f"Checkpoint directory {other} exists and is not empty."]


def test_a_resumed_run_folder_reached_through_a_symbolic_link_is_expected_too(tmp_path: Path) -> None:
    """Lightning's ``ModelCheckpoint`` names its folder by the real path; the run names the link."""
    (tmp_path / "real" / "run").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    other = tmp_path / "real" / "other"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.expect_existing_checkpoints(str(tmp_path / "link" / "run"))
        for folder in (tmp_path / "real" / "run", other):  # control: another folder still warns
            warnings.warn(f"Checkpoint directory {folder} exists and is not empty.", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == [f"Checkpoint directory {other} exists and is not empty."]


def test_evaluation_progress_bar_shows_no_empty_bar_before_its_total(monkeypatch: pytest.MonkeyPatch) -> None:
    """evaluate.py's bar is created before the planner knows the batch count: no ``0batch`` line."""
    from qgtrain.evaluation.environment import progress_bar

    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    with progress_bar(True) as bar:
        bar.total = 3
        bar.refresh()
        bar.update(3)
    shown = stream.getvalue()
    assert "0batch" not in shown and "0/3" in shown, shown


def test_a_bar_without_a_total_would_print_the_empty_line() -> None:
    """Control: tqdm's first display at creation is the line the test above forbids."""
    stream = io.StringIO()
    with tqdm(total=0, unit="batch", desc="attacking", file=stream) as bar:
        bar.total = 3
        bar.refresh()
    assert "0batch" in stream.getvalue()
