"""Weight averaging (``train.py --ema``): Lightning's ``EMAWeightAveraging`` behind
:class:`~qgtrain.training.weight_averaging.ExponentialMovingAverage`. The average against a hand
computation, what the robustness monitor and an interrupted validation see, exact resume, and
``evaluate.py``'s choice of weights; each with a control that shows the check can fail."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.utilities.exceptions import SIGTERMException

import qgtrain.callbacks.robustness as robustness
import qgtrain.cli.train as train_cli
from qgtrain.attacks import PGD
from qgtrain.callbacks import RobustnessEvaluation
from qgtrain.checkpoints import (
    INTERRUPTED_CHECKPOINT,
    TRAINED_WEIGHTS,
    InterruptCheckpoint,
    LastCheckpoint,
    RestoreLoaderState,
    StepCheckpoint,
    load_model_from_checkpoint,
)
from qgtrain.compat import averaged_model
from qgtrain.models import TinyCNN
from qgtrain.training import AdversarialTraining, quiet_trainer
from qgtrain.training.weight_averaging import ExponentialMovingAverage
from tests.helpers import (
    KillAfterBatches,
    KilledError,
    call_main,
    error_lines,
    no_training,
    small_mnist_datamodule,
)

DECAY = 0.5  # a short memory: a few steps make the average and the trained weights differ clearly
STEPS_PER_EPOCH = 4  # small_mnist_datamodule: 64 examples in batches of 16

State = dict[str, torch.Tensor]


def build() -> AdversarialTraining:
    torch.manual_seed(0)
    inner = PGD(eps=0.3, alpha=0.1, steps=1)
    return AdversarialTraining(TinyCNN(width=4), inner, track_clean_accuracy=False, lr_schedule="constant")


def copy_state(module: torch.nn.Module) -> State:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def same(a: State, b: State) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


class RecordAfterEachStep(L.Callback):
    """The module's (trained) weights after every optimizer step, and the average's when it has one."""

    def __init__(self) -> None:
        self.trained: list[State] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.trained.append(copy_state(pl_module))


def hand_ema(trained: list[State], decay: float, start_step: int) -> State:
    """W_ema = W_t up to ``start_step``, then decay * W_ema + (1 - decay) * W_t (torch's
    ``get_ema_avg_fn``; an integer buffer takes the result truncated, as ``copy_`` does)."""
    average: State = {}
    for step, weights in enumerate(trained):
        if step <= start_step:
            average = {name: value.clone() for name, value in weights.items()}
        else:
            average = {
                name: (decay * average[name] + (1 - decay) * weights[name]).to(weights[name].dtype)
                for name in weights
            }
    return average


# ----------------------------------------------------------------------------- the average itself
@pytest.mark.parametrize("start_step", [0, 3])
def test_the_average_is_the_hand_computed_ema_from_its_start_step(start_step: int, data_root: Path) -> None:
    """After fit the module holds the average (Lightning's ``on_train_end``): the hand computation over
    the recorded trained weights, bit for bit, and not the trained weights themselves."""
    module, record = build(), RecordAfterEachStep()
    trainer = quiet_trainer(
        max_epochs=2, limit_val_batches=0, callbacks=[ExponentialMovingAverage(DECAY, start_step), record]
    )
    trainer.fit(module, datamodule=small_mnist_datamodule(data_root))
    assert len(record.trained) == 2 * STEPS_PER_EPOCH
    expected = hand_ema(record.trained, DECAY, start_step)
    assert same(copy_state(module), expected)
    assert not same(expected, record.trained[-1])  # control: the average is not the trained weights


def test_before_its_start_the_average_is_the_current_model(data_root: Path) -> None:
    """A start step after the run's last step: the average stays the trained weights throughout.
    Control: Lightning's own callback keeps the module as it was at ``setup`` until its start."""
    steps = 2 * STEPS_PER_EPOCH
    results = {}
    for name, averaging in [
        ("ours", ExponentialMovingAverage(DECAY, start_step=steps)),
        ("upstream", EMAWeightAveraging(decay=DECAY, update_starting_at_step=steps)),
    ]:
        module, record = build(), RecordAfterEachStep()
        initial = copy_state(module)
        trainer = quiet_trainer(max_epochs=2, limit_val_batches=0, callbacks=[averaging, record])
        trainer.fit(module, datamodule=small_mnist_datamodule(data_root))
        results[name] = (copy_state(module), record.trained[-1], initial)
    final, trained, initial = results["ours"]
    assert same(final, trained)
    final, trained, initial = results["upstream"]
    assert same(final, initial) and not same(final, trained)


@pytest.mark.parametrize("averaging", [ExponentialMovingAverage, EMAWeightAveraging])
def test_constants_that_checkpoints_do_not_hold_are_copied_not_averaged(
    averaging: type[EMAWeightAveraging], data_root: Path
) -> None:
    """Normalize's mean (here CIFAR-10's green 0.4465, which rounding moves within 8 updates at decay
    0.9) stays the constant in the average, as a resumed run rebuilds it. Control: Lightning's
    callback alone averages it away from the constant."""
    module = build()
    module.net.normalize.mean.fill_(0.4465)
    constant = module.net.normalize.mean.clone()
    trainer = quiet_trainer(max_epochs=2, limit_val_batches=0, callbacks=[averaging(decay=0.9)])
    trainer.fit(module, datamodule=small_mnist_datamodule(data_root))
    assert torch.equal(module.net.normalize.mean, constant) == (averaging is ExponentialMovingAverage)


# ----------------------------------------------------------------------------- the robustness monitor
class SeenByTheMonitor:
    """Wraps ``evaluate_suite``: the network's weights each time the monitor attacks it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.seen: list[State] = []
        original = robustness.evaluate_suite

        def spy(model, *args, **kwargs):
            self.seen.append({f"net.{k}": v for k, v in copy_state(model).items()})
            return original(model, *args, **kwargs)

        monkeypatch.setattr(robustness, "evaluate_suite", spy)


def net_state(state: State) -> State:
    return {key: value for key, value in state.items() if key.startswith("net.")}


def monitored_run(root: Path, folder: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[SeenByTheMonitor, dict]:
    """One epoch with the monitor (FGSM on 32 validation images) and ``last.ckpt``; what the monitor
    saw and the checkpoint."""
    spy = SeenByTheMonitor(monkeypatch)
    monitor = RobustnessEvaluation(
        subset_size=32, batch_size=32, attack="fgsm", extra_attacks=[], log_hparams=False
    )
    trainer = quiet_trainer(
        max_epochs=1, limit_val_batches=1, enable_checkpointing=True,
        callbacks=[ExponentialMovingAverage(DECAY), monitor, LastCheckpoint(folder)],
    )  # fmt: skip
    trainer.fit(build(), datamodule=small_mnist_datamodule(root))
    return spy, torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)


def test_the_robustness_monitor_evaluates_the_averaged_weights(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The monitor runs at the training epoch's end, outside the validation epoch in which Lightning
    swaps the average in: it attacks the averaged weights (``last.ckpt``'s ``state_dict``, written
    right after it), and training goes on from the trained ones. Control: without the swap it
    attacks the trained weights."""
    spy, checkpoint = monitored_run(data_root, tmp_path / "swapped", monkeypatch)
    averaged, trained = checkpoint["state_dict"], checkpoint[TRAINED_WEIGHTS]
    assert len(spy.seen) == 1  # the epoch's end (the end of training: the same step)
    assert same(spy.seen[0], net_state(averaged)) and not same(spy.seen[0], net_state(trained))
    # the weights trained on are the ones a run without the monitor trains
    plain = quiet_trainer(max_epochs=1, limit_val_batches=1, enable_checkpointing=True,
                          callbacks=[ExponentialMovingAverage(DECAY), LastCheckpoint(tmp_path / "plain")])  # fmt: skip
    plain.fit(build(), datamodule=small_mnist_datamodule(data_root))
    reference = torch.load(tmp_path / "plain" / "last.ckpt", map_location="cpu", weights_only=True)
    assert same(trained, reference[TRAINED_WEIGHTS]) and same(averaged, reference["state_dict"])

    monkeypatch.setattr(robustness, "averaged_weights", lambda trainer, module: nullcontext(False))
    spy, checkpoint = monitored_run(data_root, tmp_path / "unswapped", monkeypatch)
    assert same(spy.seen[0], net_state(checkpoint[TRAINED_WEIGHTS]))


# ----------------------------------------------------------------------------- checkpoints and resume
class StopInsideValidation(L.Callback):
    """Raises what Lightning's evaluation loop raises after a batch when SIGTERM arrived."""

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        raise SIGTERMException


class RecordAverage(L.Callback):
    """The trained and the averaged weights after each step (placed after the averaging callback)."""

    def __init__(self, averaging: EMAWeightAveraging) -> None:
        self.averaging, self.trained, self.averaged = averaging, {}, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.trained = copy_state(pl_module)
        self.averaged = {k[len("module.") :]: v.clone() for k, v in averaged_model(self.averaging).state_dict().items()
                         if k.startswith("module.")}  # fmt: skip


@pytest.mark.parametrize("averaging", [ExponentialMovingAverage, EMAWeightAveraging])
def test_interrupted_inside_validation_the_checkpoint_holds_each_weight_in_its_place(
    averaging: type[EMAWeightAveraging], data_root: Path, tmp_path: Path
) -> None:
    """SIGTERM during a validation epoch: ``interrupted.ckpt`` has the average as ``state_dict`` and the
    trained weights beside it. Control: Lightning's callback alone writes them the wrong way round."""
    ema = averaging(decay=DECAY)
    record = RecordAverage(ema)
    callbacks = [ema, record, InterruptCheckpoint(tmp_path), StopInsideValidation()]
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=2, callbacks=callbacks)
    with pytest.raises(SystemExit):
        trainer.fit(build(), datamodule=small_mnist_datamodule(data_root))
    saved = torch.load(tmp_path / INTERRUPTED_CHECKPOINT, map_location="cpu", weights_only=True)
    assert not same(record.averaged, record.trained)
    right_way = same(saved["state_dict"], record.averaged) and same(saved[TRAINED_WEIGHTS], record.trained)
    assert right_way == (averaging is ExponentialMovingAverage)


def fit_with_average(
    root: Path, folder: Path, callbacks: list[L.Callback], ckpt_path: Path | None = None
) -> dict:
    """Two epochs with ``callbacks`` (in this order: the Trainer would move checkpoint callbacks to
    the end) and ``last.ckpt``; the final ``last.ckpt``."""
    trainer = quiet_trainer(
        max_epochs=2, limit_val_batches=0, enable_checkpointing=True, callbacks=[LastCheckpoint(folder)]
    )
    trainer.callbacks[:0] = [*callbacks, RestoreLoaderState()]
    try:
        trainer.fit(build(), datamodule=small_mnist_datamodule(root), ckpt_path=ckpt_path)
    except KilledError:
        pass
    return torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)


def drop_the_average(checkpoint: dict) -> None:
    checkpoint["state_dict"] = checkpoint.pop(TRAINED_WEIGHTS)
    checkpoint.pop("averaging_state")


RESUMES: dict[str, tuple[Callable[[Path], list[L.Callback]], Callable[[dict], None] | None, bool]] = {
    # (the killed run's callbacks, an edit of its step.ckpt, whether the average ends bit-equal)
    "as train.py installs it": (
        lambda f: [ExponentialMovingAverage(DECAY, 2), StepCheckpoint(f, 2)],
        None,
        True,
    ),
    "control: average dropped from the checkpoint": (
        lambda f: [ExponentialMovingAverage(DECAY, 2), StepCheckpoint(f, 2)],
        drop_the_average,
        False,
    ),
    "control: step.ckpt written before the step's update": (
        lambda f: [StepCheckpoint(f, 2), ExponentialMovingAverage(DECAY, 2)],
        None,
        False,
    ),
}


@pytest.mark.parametrize("case", list(RESUMES))
def test_killed_and_resumed_the_average_ends_bit_equal(case: str, data_root: Path, tmp_path: Path) -> None:
    """Killed after 5 of 8 steps, resumed from ``step.ckpt`` (step 4): the final ``last.ckpt`` holds
    the uninterrupted run's average and trained weights, bit for bit. The trained weights never
    depend on the average; the average does on what the checkpoint carried and when it was taken."""
    reference = fit_with_average(data_root, tmp_path / "reference", [ExponentialMovingAverage(DECAY, 2)])
    callbacks, edit, exact = RESUMES[case]
    folder = tmp_path / "killed"
    fit_with_average(data_root, folder, [*callbacks(folder), KillAfterBatches(5)])
    step = folder / "step.ckpt"
    checkpoint = torch.load(step, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 4 and TRAINED_WEIGHTS in checkpoint
    if edit is not None:
        edit(checkpoint)
        torch.save(checkpoint, step)
    resumed = fit_with_average(data_root, folder, [ExponentialMovingAverage(DECAY, 2)], step)
    assert resumed["global_step"] == reference["global_step"] == 2 * STEPS_PER_EPOCH
    assert same(resumed[TRAINED_WEIGHTS], reference[TRAINED_WEIGHTS])
    assert same(resumed["state_dict"], reference["state_dict"]) == exact
    n_averaged = [run["averaging_state"]["n_averaged"] for run in (resumed, reference)]
    assert torch.equal(*n_averaged) == exact


# ----------------------------------------------------------------------------- evaluate.py's weights
def test_evaluation_loads_the_averaged_weights_unless_asked_for_the_trained_ones(
    data_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Default: the averaged weights, said in one line; ``weights="raw"``: the trained ones. A
    checkpoint without an average loads its one set of weights either way, silently."""
    last = fit_with_average(data_root, tmp_path, [ExponentialMovingAverage(DECAY)])
    path = tmp_path / "last.ckpt"
    caplog.clear()
    with caplog.at_level("INFO", logger="qgtrain"):
        averaged, info = load_model_from_checkpoint(path)
    assert info.weights == "averaged"
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 1 and lines[0].startswith(f"{path}: evaluating its averaged weights"), lines
    raw, raw_info = load_model_from_checkpoint(path, weights="raw")
    assert raw_info.weights == "raw"
    assert same({f"net.{k}": v for k, v in copy_state(averaged).items()}, net_state(last["state_dict"]))
    assert same({f"net.{k}": v for k, v in copy_state(raw).items()}, net_state(last[TRAINED_WEIGHTS]))
    assert not same(copy_state(averaged), copy_state(raw))

    caplog.clear()
    plain = {key: value for key, value in last.items() if key not in (TRAINED_WEIGHTS, "averaging_state")}
    torch.save(plain, tmp_path / "plain.ckpt")
    for weights in ("averaged", "raw"):
        _, plain_info = load_model_from_checkpoint(tmp_path / "plain.ckpt", weights=weights)
        assert plain_info.weights == "raw"
    assert caplog.records == []


# ----------------------------------------------------------------------------- train.py --ema
def test_train_py_with_ema_checkpoints_the_average_says_so_and_resumes_only_with_it(
    data_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The issue's command, cut to 3 steps of a tiny model: ``best.ckpt`` and ``last.ckpt`` hold the
    average beside the trained weights, the monitor and the summary say the weights are averaged,
    and ``--resume`` of such a checkpoint without ``--ema`` is one line (Lightning would continue
    from the average). Control: with ``--ema`` the same resume starts training."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QGTRAIN_DATA", str(data_root))
    tiny = [
        "--net", "tiny_cnn", "--epochs", "1", "--data.init_args.val_size", "100", "--eval-size", "50",
        "--eval-steps", "2", "--trainer.enable_progress_bar", "false", "--trainer.limit_train_batches", "3",
    ]  # fmt: skip
    method = ["--inner", "pqgd", "--steps", "2", "--awp", "0.005"]
    with caplog.at_level("INFO", logger="qgtrain"):
        assert train_cli.main([*method, "--ema", "--ema-decay", "0.5", *tiny]) == 0
    run = tmp_path / "checkpoints" / "mnist-tiny_cnn-pqgd-k2-b100-awp0.005-ema"
    for name in ("best.ckpt", "last.ckpt"):
        checkpoint = torch.load(run / name, map_location="cpu", weights_only=True)
        assert not same(checkpoint["state_dict"], checkpoint[TRAINED_WEIGHTS]), name
    assert "epoch 0 robustness of the averaged weights on 50 validation examples" in caplog.text
    assert "  weights: averaged (--ema)" in capsys.readouterr().out

    monkeypatch.setattr(L.Trainer, "fit", no_training)
    resume = ["--resume", str(run / "last.ckpt"), "--epochs", "2"]
    assert call_main(train_cli.main, [*method, *tiny, *resume]) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"train.py: error: --resume: {run / 'last.ckpt'} holds averaged weights (it was trained with --ema); "
        "resume with --ema"
    ]
    with pytest.raises(AssertionError, match="training started"):
        train_cli.main([*method, "--ema", "--ema-decay", "0.5", *tiny, *resume])


@pytest.mark.parametrize("ema", [True, False])
def test_weights_only_checkpoints_are_refused_with_ema_only(ema: bool) -> None:
    """Lightning's weights-only checkpoints skip the callbacks' on_save_checkpoint, where the average
    is written: with --ema refused at start-up; without it (the control) accepted."""
    from jsonargparse import Namespace

    from qgtrain.run_setup import StartError, check_settings

    config = Namespace(
        trainer=Namespace(max_epochs=1), model=Namespace(inner=None), run_name=None, resume=None,
        resume_override=False, ema=ema, ema_decay=0.999, ema_start_step=0,
        checkpoint=Namespace(save_weights_only=True),
    )  # fmt: skip
    if ema:
        with pytest.raises(StartError, match="save_weights_only drops the average"):
            check_settings(config)
    else:
        check_settings(config)
