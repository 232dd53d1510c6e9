"""``--resume`` checks what it resumes: the checkpoint records dataset, network, objective, inner
attack, eps and optimizer, the inner attack's arguments, the module's training hyperparameters and
the optimizer's settings; another value is refused in one line naming the flag that resumes as
recorded, and ``--resume-override`` continues the weights, applies a new optimizer setting over the
restored state and records where the weights came from; a new span of the learning-rate schedule
(`--epochs`) is said in one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
import pytest
import torch

import qgtrain.cli.train as train_cli
from qgtrain.training.module import schedule_change
from tests.helpers import ONE_STEP_ARGS, call_main, error_lines, no_training, output_roots

ONE_STEP = [*ONE_STEP_ARGS, "--run-name", "r"]


@pytest.fixture(scope="module")
def trained(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One Adam step of a TinyCNN on MNIST, PGD-1 at eps 0.3, madry objective: ``ROOT/ckpt/r/last.ckpt``."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QGTRAIN_DATA", str(data_root))
        assert call_main(train_cli.main, [*ONE_STEP, *output_roots(root), "--epochs", "1"]) == 0
    return root


@pytest.fixture
def run(trained: Path, tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the trained run's output root."""
    monkeypatch.setenv("QGTRAIN_DATA", str(data_root))
    shutil.copytree(trained, tmp_path / "out")
    return tmp_path / "out"


CHANGES = {
    "optimizer": (["--model.optimizer", "torch.optim.SGD", "--model.optimizer.init_args.lr", "0.01"],
                  "optimizer torch.optim.adam.Adam, this run has torch.optim.sgd.SGD",
                  "--model.optimizer torch.optim.adam.Adam"),
    "eps": (["--eps", "0.2"], "eps 0.3, this run has 0.2", "--eps 0.3"),
    "objective": (["--model.objective", "trades"], "objective madry, this run has trades", "--model.objective madry"),
    "inner": (["--inner", "fgsm"], "inner pgd, this run has fgsm", "--inner pgd"),
    "dataset": (["--data", "qgtrain.data.FashionMNISTDataModule"], "dataset mnist, this run has fashion_mnist",
                "--dataset mnist"),
    "steps": (["--steps", "2"], "inner.steps 1, this run has 2", "--steps 1"),
    "lr": (["--lr", "0.01"], "optimizer.lr 0.001, this run has 0.01", "--lr 0.001"),
    "lr_schedule": (["--model.lr_schedule", "constant"], "lr_schedule piecewise, this run has constant",
                    "--model.lr_schedule piecewise"),
    "awp": (["--awp", "0.01"], "awp_gamma 0.0, this run has 0.01", "--awp 0.0"),
    "batch size": (["--batch-size", "50"], "data.batch_size 100, this run has 50", "--batch-size 100"),
    "validation split": (["--data.init_args.val_size", "50"], "data.val_size 100, this run has 50",
                         "--data.init_args.val_size 100"),
}  # fmt: skip


@pytest.mark.parametrize("change", list(CHANGES))
def test_resuming_with_another_run_definition_is_one_line_naming_the_flag(
    change: str, run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(L.Trainer, "fit", no_training)
    flags, difference, as_recorded = CHANGES[change]
    last = run / "ckpt" / "r" / "last.ckpt"
    argv = [*ONE_STEP, *output_roots(run), "--epochs", "2", "--resume", "last"]
    assert call_main(train_cli.main, [*argv, *flags]) == 2
    stderr = capsys.readouterr().err
    assert error_lines(stderr) == [
        f"train.py: error: --resume: {last} was trained with {difference}; resume with {as_recorded}, "
        "or pass --resume-override to continue its weights with this run's"
    ]
    assert "Traceback" not in stderr
    with pytest.raises(AssertionError, match="training started"):  # the control: as recorded, accepted
        train_cli.main(argv)


def test_the_suggested_flags_resume_when_one_change_moves_another_value(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """PQGD's α comes from its rule ε / steps: another ``--steps`` changes the recorded α too, and α
    comes first in the record. The refusal's suggestion names every flag, so appending it as printed
    resumes (naming only the first, ``--alpha 0.4``, would be refused again for the steps)."""
    monkeypatch.setenv("QGTRAIN_DATA", str(data_root))
    torch.set_num_threads(1)
    rule = [a for a in ONE_STEP_ARGS if a not in ("--alpha", "0.75")]
    rule[rule.index("pgd")] = "pqgd"
    argv = [*rule, "--run-name", "r", *output_roots(tmp_path), "--epochs", "1"]
    assert call_main(train_cli.main, argv) == 0
    monkeypatch.setattr(L.Trainer, "fit", no_training)
    refused = [*argv[: argv.index("--epochs")], "--epochs", "2", "--resume", "last", "--steps", "2"]
    assert call_main(train_cli.main, refused) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "was trained with inner.alpha 0.4, this run has 0.2 (and inner.steps)" in line, line
    suggestion = line.split("; resume with ")[1].split(", or pass")[0]
    assert suggestion == "--alpha 0.4 --steps 1", line
    with pytest.raises(AssertionError, match="training started"):  # as printed, accepted
        train_cli.main([*refused, *suggestion.split()])


def test_an_older_checkpoint_without_the_optimizer_record_is_checked_by_its_state(
    run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Written before the optimizer was recorded: Adam's state (``betas``) has no ``momentum``, so
    SGD is refused in one line instead of Lightning's ``KeyError: 'momentum'``."""
    monkeypatch.setattr(L.Trainer, "fit", no_training)
    last = run / "ckpt" / "r" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    del checkpoint["qgtrain"]["optimizer"], checkpoint["qgtrain"]["dataset"]
    torch.save(checkpoint, last)
    argv = [*ONE_STEP, *output_roots(run), "--epochs", "2", "--resume", "last"]
    assert call_main(train_cli.main, [*argv, *CHANGES["optimizer"][0]]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "was trained with optimizer another optimizer" in lines[0], lines
    with pytest.raises(AssertionError, match="training started"):  # control: Adam again
        train_cli.main(argv)


def test_resume_override_continues_the_weights_and_records_where_they_came_from(
    run: Path, capsys: pytest.CaptureFixture
) -> None:
    """Adam -> SGD with ``--resume-override``: the weights continue, SGD starts with a fresh state
    (Adam's cannot be loaded into it), and the new checkpoint records SGD and its origin."""
    last = run / "ckpt" / "r" / "last.ckpt"
    before = torch.load(last, weights_only=True)
    argv = [*ONE_STEP, *output_roots(run), "--epochs", "2", "--resume", "last", *CHANGES["optimizer"][0]]
    assert call_main(train_cli.main, [*argv, "--resume-override"]) == 0
    after = torch.load(last, weights_only=True)
    assert after["global_step"] == 2 and after["qgtrain"]["optimizer"] == "torch.optim.sgd.SGD"
    assert after["callbacks"]["WeightsOrigin"]["weights_from"] == [
        {"checkpoint": str(last), "changed": {"optimizer": {"recorded": "torch.optim.adam.Adam",
                                                            "now": "torch.optim.sgd.SGD"}}}
    ]  # fmt: skip
    assert "momentum" in after["optimizer_states"][0]["param_groups"][0]  # SGD's own state
    assert any(not torch.equal(after["state_dict"][k], v) for k, v in before["state_dict"].items())
    assert "WeightsOrigin" not in before["callbacks"]  # the control: a plain run records no origin


def test_resume_override_with_a_new_learning_rate_trains_at_it(run: Path) -> None:
    """Lightning restores the optimizer's and the scheduler's state over the fresh optimizer, so a
    new ``--lr`` would be ignored; with ``--resume-override`` it is written into the restored state
    (the base lr, and the current one rescaled). Control: the checkpoint resumed holds 0.001."""
    last = run / "ckpt" / "r" / "last.ckpt"
    before = torch.load(last, weights_only=True)
    assert before["optimizer_states"][0]["param_groups"][0]["initial_lr"] == 0.001
    argv = [*ONE_STEP, *output_roots(run), "--epochs", "2", "--resume", "last", "--lr", "0.01"]
    assert call_main(train_cli.main, [*argv, "--resume-override"]) == 0
    after = torch.load(last, weights_only=True)
    group = after["optimizer_states"][0]["param_groups"][0]
    assert group["initial_lr"] == 0.01 and after["lr_schedulers"][0]["base_lrs"] == [0.01]
    assert after["callbacks"]["WeightsOrigin"]["weights_from"][0]["changed"] == {
        "optimizer.lr": {"recorded": "0.001", "now": "0.01"}
    }


def test_resuming_an_average_with_another_decay_is_one_line_naming_the_flag(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The weight average's decay and start step are in its callback state; another value is refused
    like the rest of the run definition. Control: the recorded decay resumes."""
    monkeypatch.setenv("QGTRAIN_DATA", str(data_root))
    argv = [*ONE_STEP, *output_roots(tmp_path), "--ema", "--ema-decay", "0.99"]
    assert call_main(train_cli.main, [*argv, "--epochs", "1"]) == 0
    monkeypatch.setattr(L.Trainer, "fit", no_training)
    resume = [*argv, "--epochs", "2", "--resume", "last"]
    assert call_main(train_cli.main, [*resume, "--ema-decay", "0.9"]) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"train.py: error: --resume: {tmp_path / 'ckpt' / 'r' / 'last.ckpt'} was trained with ema.decay 0.99, "
        "this run has 0.9; resume with --ema-decay 0.99, or pass --resume-override to continue its weights "
        "with this run's"
    ]
    with pytest.raises(AssertionError, match="training started"):
        train_cli.main(resume)


def test_resuming_with_more_epochs_says_where_the_learning_rate_goes(
    run: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``--epochs`` is how a run trains longer, so it is not refused, but the piecewise schedule scales
    with the span: the trained run spanned 1 step and ended at 0.01x; with ``--epochs 4`` it spans 4
    and step 1 is at 1x again. Said in one line; the new checkpoint records the new span."""
    last = run / "ckpt" / "r" / "last.ckpt"
    assert torch.load(last, weights_only=True)["qgtrain"]["schedule_steps"] == 1
    argv = [*ONE_STEP, *output_roots(run), "--epochs", "4", "--resume", "last"]
    assert call_main(train_cli.main, argv) == 0
    said = [
        record.getMessage() for record in caplog.records if "learning-rate schedule" in record.getMessage()
    ]
    assert said == [
        "resuming: the piecewise learning-rate schedule now spans 4 optimizer steps (recorded: 1; --epochs "
        "or --trainer.max_steps changed); at step 1 the rate is 1x the base lr (0.01x as recorded)"
    ]
    assert torch.load(last, weights_only=True)["qgtrain"]["schedule_steps"] == 4


def test_the_same_span_or_a_constant_rate_says_nothing() -> None:
    """The control of the announcement: nothing when the span is the recorded one or the rate constant."""
    assert schedule_change("piecewise", 4, 4, 1) is None
    assert schedule_change("constant", 1, 4, 1) is None
    assert schedule_change("onecycle", 10, 20, 5) is not None
