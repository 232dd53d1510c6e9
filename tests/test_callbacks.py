"""Robustness callbacks: documented keys and TensorBoard views, exact accuracy, overfitting guard, DDP."""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from qgtrain.attacks import PGD, PQGD, build_attack
from qgtrain.callbacks import AttackVisualization, RobustnessEvaluation, shard_batches, subset_indices
from qgtrain.callbacks.robustness import WORST_ACC
from qgtrain.callbacks.validation_data import limited_validation_size
from qgtrain.checkpoints import best_checkpoint
from qgtrain.cli.train import build_cli, main
from qgtrain.data import MNISTDataModule
from qgtrain.evaluation import adversarial_correct, clean_correct
from qgtrain.evaluation.protocol import evaluate_suite
from qgtrain.models import TinyCNN
from qgtrain.training import AdversarialTraining, quiet_trainer
from qgtrain.training.module import VAL_ADV_ACC
from qgtrain.training.trainer import EPOCH_NUMBERING, run_summary

EPS = 0.1  # small enough that a briefly trained tiny CNN keeps some robust accuracy: no 0 == 0 checks
DOCUMENTED_SCALARS = [
    "robust/clean_acc",
    "robust/blob_qg_acc",
    "robust/apgd_t_acc",
    "robust/gradient_share",
    "robust/worst_acc",
    "robust/best_worst_acc",
    "robust/eval_seconds",
    "robust/eval_time_share",
]


def _datamodule(data_root: Path) -> MNISTDataModule:
    return MNISTDataModule(
        data_dir=str(data_root),
        batch_size=50,
        eval_batch_size=100,
        val_size=200,
        train_subset=100,
        download=False,
        seed=0,
    )


def _module(trained: TinyCNN, lr: float = 1e-4) -> AdversarialTraining:
    net = TinyCNN(dataset="mnist", width=trained.width)
    net.load_state_dict(trained.state_dict())
    return AdversarialTraining(
        net,
        PQGD(eps=EPS, alpha=0.05, steps=2, b=100),
        val_attack=PGD(eps=EPS, alpha=0.05, steps=2),
        optimizer=functools.partial(torch.optim.SGD, lr=lr),
        eps_warmup_epochs=0.0,
    )


def _trainer(**kwargs) -> L.Trainer:
    return quiet_trainer(**{"max_epochs": 1, "limit_val_batches": 1, **kwargs})


@pytest.fixture(scope="module")
def short_run(data_root: Path, trained_tiny_model: TinyCNN, tmp_path_factory: pytest.TempPathFactory):
    """One epoch of PQGD training with both callbacks and a TensorBoard logger."""
    log_dir = tmp_path_factory.mktemp("tb")
    robustness = RobustnessEvaluation(subset_size=64, batch_size=32, eps=EPS, steps=3, seed=3)
    visualization = AttackVisualization(num_images=4, batch_size=16)
    datamodule = _datamodule(data_root)
    module = _module(trained_tiny_model)
    logger = TensorBoardLogger(str(log_dir), name="run", default_hp_metric=False)
    trainer = _trainer(logger=logger, callbacks=[robustness, visualization])
    trainer.fit(module, datamodule=datamodule)
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    events.Reload()
    return SimpleNamespace(
        trainer=trainer, module=module, datamodule=datamodule, robustness=robustness, events=events
    )


def test_callback_logs_the_documented_keys(short_run) -> None:
    metrics = short_run.trainer.callback_metrics
    assert set(DOCUMENTED_SCALARS) <= set(metrics)
    clean, blob, pgd, worst = (
        float(metrics[f"robust/{k}_acc"]) for k in ("clean", "blob_qg", "apgd_t", "worst")
    )
    # Robust counts need clean correctness; the worst case is per example, so at most the weaker attack.
    assert 0.0 < worst <= min(blob, pgd) <= max(blob, pgd) <= clean <= 1.0
    assert float(metrics["robust/eval_seconds"]) > 0 and 0 < float(metrics["robust/eval_time_share"]) < 1


def test_tensorboard_holds_scalars_image_histograms_and_hparams(short_run) -> None:
    tags = short_run.events.Tags()
    assert set(DOCUMENTED_SCALARS) <= set(tags["scalars"])
    assert {"attack/step_loss_first", "attack/step_loss_last", "attack/reference_step_loss_last"} <= set(
        tags["scalars"]
    )
    assert {"images/adversarial_grid", "attack/step_loss_curve"} <= set(tags["images"])
    assert {"attack/grad_quantized", "attack/grad_abs"} <= set(tags["histograms"])
    # Fig. 2: the quantized gradient of PQGD (b=100) spreads over [-b, b]; its per-example maximum maps to +-b.
    quantized = short_run.events.Histograms("attack/grad_quantized")[-1].histogram_value
    assert max(abs(quantized.min), abs(quantized.max)) == 100.0
    grad_abs = short_run.events.Histograms("attack/grad_abs")[-1].histogram_value
    assert grad_abs.min >= 0 and grad_abs.max > 0
    # The inner attack ascends: the loss on its final inputs is above the loss at its random start.
    first = short_run.events.Scalars("attack/step_loss_first")[-1].value
    assert short_run.events.Scalars("attack/step_loss_last")[-1].value > first
    # HParams tab: the run's hyperparameters with the final clean and robust accuracy.
    content = short_run.events.PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = session.session_start_info.hparams
    assert hparams["inner/name"].string_value == "pqgd" and hparams["inner/steps"].number_value == 2
    robust = short_run.events.Scalars("hparams/robust_acc")[-1].value
    assert robust == pytest.approx(float(short_run.trainer.callback_metrics["robust/worst_acc"]))


def test_logged_accuracy_equals_a_direct_call_of_the_same_attack(short_run) -> None:
    """Same subset (seeded choice), same batches, same seed: the same per-example results."""
    robustness, net = short_run.robustness, short_run.module.net
    val_set = short_run.datamodule.val_set
    indices = subset_indices(len(val_set), 64, seed=3)
    x = torch.stack([val_set[int(i)][0] for i in indices])
    y = torch.stack([val_set[int(i)][1] for i in indices])
    batches = list(zip(x.split(32), y.split(32), strict=True))
    alpha = 2.5 * EPS / 3  # the documented default step size for eps=EPS, steps=3
    attacks = {
        "blob_qg": build_attack("blob_qg", eps=EPS, alpha=alpha, steps=3, b=100),
        "apgd_t": build_attack("apgd_t", eps=EPS, steps=3, targets=2),  # the default extra attack
    }
    assert {k: a.config() for k, a in attacks.items()} == {
        k: a.config() for k, a in robustness.attacks.items()
    }
    # With early exit (the default) APGD-T attacks only what BLOB_QG left robust: `robust/apgd_t_acc` is the
    # accuracy after both, as AutoAttack reports it; evaluate.py's engine gives the same vectors.
    outcome = evaluate_suite(net, list(attacks.values()), batches, seed=3)
    direct = {"clean": outcome.clean, "blob_qg": outcome.after[0], "apgd_t": outcome.after[1]}
    direct["worst"] = outcome.robust
    alone = {name: adversarial_correct(net, attack, batches, seed=3) for name, attack in attacks.items()}
    assert torch.equal(direct["blob_qg"], alone["blob_qg"]), "the first attack sees what it sees alone"
    # Random starts (and APGD-T's targets) are drawn for the whole batch: a survivor is attacked as alone.
    assert torch.equal(direct["worst"], alone["blob_qg"] & alone["apgd_t"])
    assert torch.equal(direct["clean"], clean_correct(net, batches))
    logged = short_run.trainer.callback_metrics
    for key, correct in direct.items():
        assert float(logged[f"robust/{key}_acc"]) == pytest.approx(correct.float().mean().item(), abs=1e-9)


def test_evaluation_leaves_training_state_and_rng_untouched(short_run) -> None:
    net = short_run.module.net
    net.train()
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    short_run.robustness.evaluate(short_run.trainer, short_run.module)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(m.training for m in net.modules())
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_overfitting_guard_warns_on_a_crafted_drop(caplog: pytest.LogCaptureFixture) -> None:
    guard = RobustnessEvaluation(overfit_margin=0.2, eps=0.3)
    trainer = SimpleNamespace(is_global_zero=True, should_stop=False)
    with caplog.at_level(logging.WARNING, logger="qgtrain.callbacks.robustness"):
        fired = [
            guard.check_overfitting(e, acc, trainer) for e, acc in enumerate([0.30, 0.45, 0.40, 0.27, 0.20])
        ]
    assert fired == [False, False, False, False, True]  # 0.45 -> 0.27 is 18 points; 0.45 -> 0.20 is 25
    assert guard.best_worst_acc == 0.45 and guard.best_epoch == 1
    assert len(caplog.records) == 1 and "catastrophic overfitting" in caplog.records[0].getMessage()
    assert trainer.should_stop is False  # warning only, by default
    stopper = RobustnessEvaluation(overfit_margin=0.2, eps=0.3, stop_on_overfit=True)
    for epoch, acc in enumerate([0.6, 0.1]):
        stopper.check_overfitting(epoch, acc, trainer)
    assert trainer.should_stop is True


def test_training_gap_guard_fires_on_a_crafted_gap_only() -> None:
    guard = RobustnessEvaluation(overfit_gap=0.3, eps=0.3)
    trainer = SimpleNamespace(is_global_zero=True, should_stop=False)
    assert not guard.check_training_gap(2, train_adv_acc=0.60, worst_acc=0.35, trainer=trainer)  # 25 points
    assert not guard.overfit_detected
    assert guard.check_training_gap(3, train_adv_acc=0.80, worst_acc=0.05, trainer=trainer)  # 75 points
    assert guard.overfit_detected and trainer.should_stop is False


@pytest.mark.parametrize(
    ("inner", "warmup", "judged"),
    [("fgsm_rs", 0.0, True), ("pqgd", 0.0, False), ("fgsm_rs", 5.0, False)],
    ids=["single-step", "control: multi-step", "control: during warm-up"],
)
def test_training_gap_guard_reads_this_epochs_training_accuracy(
    inner: str, warmup: float, judged: bool, data_root: Path, trained_tiny_model: TinyCNN
) -> None:
    """The guard sees the epoch's train/adv_acc (not yet reset) for a single-step inner attack at
    full eps, and judges neither a multi-step attack nor a warm-up epoch."""
    scripted = ScriptedRobustness([0.0], overfit_gap=0.0)
    module = _module(trained_tiny_model)
    module.inner = build_attack(inner, eps=EPS, **({"steps": 2, "alpha": 0.05} if inner == "pqgd" else {}))
    module.hparams.eps_warmup_epochs = warmup
    trainer = _trainer(limit_train_batches=2, callbacks=[scripted])
    trainer.fit(module, datamodule=_datamodule(data_root))
    logged = float(trainer.callback_metrics["train/adv_acc"])
    assert (scripted.gap_seen == pytest.approx(logged)) if judged else scripted.gap_seen is None
    assert scripted.overfit_detected is (judged and logged > 0)
    assert not judged or logged > 0  # the judged case can fire: the gap check is not vacuous


class ScriptedRobustness(RobustnessEvaluation):
    """Reports a crafted robust-accuracy sequence instead of running attacks."""

    def __init__(self, sequence: list[float], **kwargs) -> None:
        super().__init__(**kwargs)
        self.sequence = sequence
        self.gap_seen: float | None = None

    def check_training_gap(self, epoch, train_adv_acc, worst_acc, trainer=None) -> bool:
        self.gap_seen = train_adv_acc
        return super().check_training_gap(epoch, train_adv_acc, worst_acc, trainer)

    def evaluate(self, trainer, pl_module) -> dict[str, float]:
        self._evaluated_step = trainer.global_step
        self.last_results = {
            "robust/clean_acc": 1.0,
            "robust/worst_acc": self.sequence[trainer.current_epoch],
        }
        return self.last_results


def test_best_checkpoint_holds_the_best_robust_model_and_collapse_stops_training(
    data_root: Path, trained_tiny_model: TinyCNN, tmp_path: Path
) -> None:
    """The train CLI's checkpoint settings: `best` follows robust/worst_acc, also across epochs
    without an evaluation (every_n_epochs=2: epochs 0, 1, 3 are evaluated, 2 is not)."""
    scripted = ScriptedRobustness([0.5, 0.7, 0.9, 0.2, 0.2], every_n_epochs=2, stop_on_overfit=True)
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path,
        filename="best",
        monitor="robust/worst_acc",
        mode="max",
        save_last=True,
        save_on_train_epoch_end=True,
        auto_insert_metric_name=False,
    )
    trainer = _trainer(
        max_epochs=5, limit_train_batches=1, enable_checkpointing=True, callbacks=[scripted, checkpoint]
    )
    trainer.fit(_module(trained_tiny_model), datamodule=_datamodule(data_root))
    assert scripted.overfit_detected and trainer.current_epoch == 4  # stopped after epoch 3 of 5
    # epoch 2's 0.9 was never evaluated, so it cannot be the best; epoch 1's 0.7 is.
    assert torch.load(tmp_path / "best.ckpt", weights_only=True)["epoch"] == 1
    assert checkpoint.best_model_score == pytest.approx(0.7)


class RadiusPerEpoch(RobustnessEvaluation):
    """The real evaluation, at a radius chosen per epoch (so the best epoch is known in advance)."""

    def __init__(self, radii: list[float], **kwargs) -> None:
        super().__init__(**kwargs)
        self.radii = radii

    def evaluate(self, trainer, pl_module) -> dict[str, float]:
        self.attacks = self.build_attacks(self.radii[trainer.current_epoch])
        return super().evaluate(trainer, pl_module)


class BarLabels(L.Callback):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        self.seen.append(trainer.progress_bar_callback.train_progress_bar.desc.rstrip(": "))


def test_one_epoch_numbering_in_the_bar_the_robustness_lines_the_checkpoint_and_the_summary(
    data_root: Path, trained_tiny_model: TinyCNN, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 26.6: three epochs, the second evaluated at a tiny radius so that it is the best. The
    progress bar's ``Epoch 1``, the robustness line ``epoch 1 robustness ...``, ``best.ckpt``'s
    ``epoch``, the callback's best epoch and the end-of-run summary all name it 1 (from 0)."""
    robustness = RadiusPerEpoch([0.3, 0.002, 0.3], subset_size=64, batch_size=64, extra_attacks=[], steps=2)
    labels = BarLabels()
    best = ModelCheckpoint(dirpath=tmp_path, **{**best_checkpoint(WORST_ACC), "save_last": False})
    trainer = _trainer(
        max_epochs=3, limit_train_batches=1, enable_checkpointing=True, enable_progress_bar=True,
        callbacks=[robustness, labels, best],
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="qgtrain.callbacks.robustness"):
        trainer.fit(_module(trained_tiny_model), datamodule=_datamodule(data_root))
    lines = re.findall(r"epoch (\d+) robustness on 64 validation examples: .*worst=([\d.]+)%", caplog.text)
    assert [int(epoch) for epoch, _ in lines] == [0, 1, 2]
    worst = [float(value) for _, value in lines]
    best_epoch = worst.index(max(worst))
    assert best_epoch == 1 and worst[1] > max(worst[0], worst[2])  # not the trivial epoch 0
    assert labels.seen == ["Epoch 0", "Epoch 1", "Epoch 2"]
    assert torch.load(tmp_path / "best.ckpt", weights_only=True)["epoch"] == best_epoch
    assert robustness.best_epoch == best_epoch
    summary = run_summary(trainer, "r", tmp_path).splitlines()[0]
    assert summary == (
        f"run r finished: best {WORST_ACC} = {float(best.best_model_score):.4f} at epoch {best_epoch} "
        f"({EPOCH_NUMBERING})"
    )


def test_eval_flags_and_eps_reach_the_robustness_config(
    capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    argv = ["--eval-every", "3", "--eval-attack", "pgd", "--eval-steps", "7", "--eval-size", "300"]
    with pytest.raises(SystemExit):
        main([*argv, "--eval-b", "5", "--eps", "0.2", "--print_config"])
    cfg = yaml.safe_load(capsys.readouterr().out)
    rob = cfg["robustness"]
    assert (rob["every_n_epochs"], rob["attack"], rob["steps"], rob["subset_size"], rob["b"], rob["eps"]) == (
        3,
        "pgd",
        7,
        300,
        5,
        None,  # follows the validation radius, which --eps sets
    )
    assert cfg["model"]["val_attack"]["init_args"]["eps"] == 0.2
    assert cfg["visualization"]["every_n_epochs"] == 3
    assert cfg["checkpoint"]["monitor"] == "robust/worst_acc"
    roots = ["--checkpoint_root", str(tmp_path / "ck"), "--log_root", str(tmp_path / "lg")]
    cli = build_cli(["--eps", "0.2", "--net", "tiny_cnn", *roots])
    robustness = next(c for c in cli.trainer.callbacks if isinstance(c, RobustnessEvaluation))
    assert robustness.resolve_eps(cli.model) == 0.2
    for bad, message in (
        (["--eval-attack", "cw"], "--eval-attack: unknown attack 'cw'; choose one of"),
        (["--eval-every", "-1"], "--eval-every must be >= 0"),
    ):
        with pytest.raises(SystemExit) as info:
            main([*bad, "--net", "tiny_cnn", *roots])
        assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:.*LightningCLI's args parameter")
def test_turning_evaluation_off_falls_back_to_validation_accuracy(tmp_path: Path) -> None:
    common = [
        "--checkpoint_root",
        str(tmp_path / "ck"),
        "--log_root",
        str(tmp_path / "lg"),
        "--net",
        "tiny_cnn",
    ]
    monitors = {}
    for every in ("0", "2"):
        cli = build_cli([*common, "--eval-every", every, "--run-name", f"r{every}"])
        (checkpoint,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, ModelCheckpoint) and cb.monitor]
        robustness = [cb for cb in cli.trainer.callbacks if isinstance(cb, RobustnessEvaluation)]
        assert len(robustness) == 1 and robustness[0].every_n_epochs == int(every)
        monitors[every] = checkpoint.monitor
    assert monitors == {"0": VAL_ADV_ACC, "2": WORST_ACC} == {"0": "val/adv_acc", "2": "robust/worst_acc"}


@pytest.mark.parametrize(("examples", "batch", "world"), [(90, 20, 2), (100, 25, 2), (30, 20, 3), (7, 10, 2)])
def test_shards_cover_every_batch_once(examples: int, batch: int, world: int) -> None:
    shards = [shard_batches(examples, batch, rank, world) for rank in range(world)]
    assert shards[0][0] == 0 and all(a[1] == b[0] for a, b in zip(shards, shards[1:], strict=False))
    assert shards[-1][1] == -(-examples // batch)


def test_quick_runs_get_a_quick_evaluation() -> None:
    def trainer(limit):
        return SimpleNamespace(
            limit_val_batches=limit, datamodule=SimpleNamespace(eval_batch_size=100), val_dataloaders=None
        )

    assert limited_validation_size(trainer(2), 5000) == 200
    assert limited_validation_size(trainer(0.1), 5000) == 500
    assert limited_validation_size(trainer(100), 5000) == 5000
    assert limited_validation_size(trainer(1.0), 5000) == 5000


def test_bad_robustness_settings_are_one_line_errors(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    for argv, message in (
        (["--robustness.steps", "0"], "robustness.steps must be an integer >= 1"),
        (["--robustness.extra_attacks=[cw]"], "unknown attack 'cw'"),
    ):
        with pytest.raises(SystemExit) as info:
            main([*argv, "--checkpoint_root", str(tmp_path / "ck"), "--log_root", str(tmp_path / "lg")])
        err = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == 2 and len(err) == 1 and message in err[0]


@pytest.mark.slow
def test_two_ddp_processes_report_what_one_process_reports(
    data_root: Path, trained_tiny_model: TinyCNN
) -> None:
    """90 examples in batches of 20 (5 batches: 3 on rank 0, 2 on rank 1), BLOB_QG and PGD with random
    starts: whole-batch sharding with per-batch seeds makes even these exact; lr=0 keeps the weights equal."""
    results = {}
    for devices, strategy in ((1, "auto"), (2, "ddp_spawn")):
        robustness = RobustnessEvaluation(subset_size=90, batch_size=20, eps=EPS, steps=3, seed=1)
        trainer = _trainer(devices=devices, strategy=strategy, limit_train_batches=1, callbacks=[robustness])
        trainer.fit(_module(trained_tiny_model, lr=0.0), datamodule=_datamodule(data_root))
        results[devices] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.endswith("_acc")}
    assert 0.0 < results[1]["robust/worst_acc"] < results[1]["robust/clean_acc"]
    for key in ("robust/clean_acc", "robust/blob_qg_acc", "robust/apgd_t_acc", "robust/worst_acc"):
        assert results[2][key] == results[1][key], key
