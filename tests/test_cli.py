"""train.py: short flags map onto the LightningCLI config; the main job writes checkpoints, logs and config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from qgtrain.cli.aliases import UsageError, expand_short_flags
from qgtrain.cli.train import main


def resolved_config(capsys: pytest.CaptureFixture, *argv: str) -> dict:
    with pytest.raises(SystemExit) as info:
        main([*argv, "--print_config"])
    assert info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_main_job_flags_resolve_to_paper_defaults(capsys: pytest.CaptureFixture) -> None:
    cfg = resolved_config(capsys, "--inner", "pqgd", "--steps", "10")
    inner = cfg["model"]["inner"]
    assert inner["class_path"] == "qgtrain.attacks.PQGD"
    assert (
        inner["init_args"]["steps"] == 10
        and inner["init_args"]["eps"] == 0.3
        and inner["init_args"]["b"] >= 100
    )
    assert cfg["model"]["net"]["class_path"] == "qgtrain.models.MadryMNIST"
    assert cfg["data"]["class_path"] == "qgtrain.data.MNISTDataModule"
    assert cfg["trainer"]["inference_mode"] is False


def test_switching_inner_attack_resets_class_specific_arguments(capsys: pytest.CaptureFixture) -> None:
    pgd = resolved_config(capsys, "--inner", "pgd", "--steps", "40")["model"]["inner"]
    assert pgd["class_path"] == "qgtrain.attacks.PGD" and pgd["init_args"]["b"] == 1
    assert pgd["init_args"]["steps"] == 40
    fgsm = resolved_config(capsys, "--inner", "fgsm_rs")["model"]["inner"]["init_args"]
    assert fgsm["steps"] == 1 and fgsm["alpha"] is None
    none = resolved_config(capsys, "--inner", "none")["model"]["inner"]
    assert none is None
    # Standard training stays standard when a radius is given (for validation and evaluation).
    none_eps = resolved_config(capsys, "--inner", "none", "--eps", "0.2")
    assert none_eps["model"]["inner"] is None
    assert none_eps["model"]["val_attack"]["init_args"]["eps"] == 0.2 and none_eps["robustness"]["eps"] == 0.2


def test_every_short_flag_lands_in_the_config(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    cfg = resolved_config(
        capsys,
        "--dataset",
        "fashion_mnist",
        "--inner",
        "blob_qg",
        "--steps",
        "7",
        "--eps",
        "0.15",
        "--alpha",
        "0.02",
        "--b",
        "500",
        "--model",
        "tiny_cnn",
        "--epochs",
        "3",
        "--batch-size",
        "64",
        "--lr",
        "0.002",
        "--devices",
        "1",
        "--strategy",
        "auto",
        "--precision",
        "bf16-mixed",
        "--seed",
        "5",
        "--data-dir",
        str(tmp_path),
        "--run-name",
        "exp1",
    )
    inner = cfg["model"]["inner"]["init_args"]
    assert cfg["model"]["inner"]["class_path"] == "qgtrain.attacks.BLOBQG"
    assert (inner["steps"], inner["eps"], inner["alpha"], inner["b"]) == (7, 0.15, 0.02, 500)
    assert cfg["model"]["val_attack"]["init_args"]["eps"] == 0.15
    assert cfg["model"]["net"]["class_path"] == "qgtrain.models.TinyCNN"
    assert cfg["model"]["net"]["init_args"]["dataset"] == "fashion_mnist"
    assert cfg["data"]["class_path"] == "qgtrain.data.FashionMNISTDataModule"
    assert cfg["trainer"]["max_epochs"] == 3 and cfg["trainer"]["precision"] == "bf16-mixed"
    assert cfg["data"]["init_args"]["batch_size"] == 64 and cfg["data"]["init_args"]["data_dir"] == str(
        tmp_path
    )
    assert cfg["model"]["optimizer"]["init_args"]["lr"] == 0.002
    assert cfg["seed_everything"] == 5 and cfg["model"]["seed"] == 5 and cfg["data"]["init_args"]["seed"] == 5
    assert cfg["run_name"] == "exp1"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--inner", "pgdx"], "--inner must be one of none, fgsm"),
        (["--steps", "0"], "--steps must be an integer >= 1"),
        (["--b", "2.5"], "--b must be an integer >= 1"),
        (["--eps", "1.5"], "--eps must be in (0, 1]"),
        (["--alpha", "0"], "--alpha must be in (0"),
        (["--dataset", "svhn"], "--dataset must be one of mnist"),
        (["--inner", "none", "--steps", "3"], "--steps needs an inner attack"),
    ],
)
def test_bad_short_flags_are_one_line_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError) as info:
        expand_short_flags(argv)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_dotted_arguments_keep_their_place_after_config_files() -> None:
    args = expand_short_flags(["--config", "a.yaml", "--model.net.init_args.width", "4", "--inner", "pgd"])
    assert args[:4] == ["--config", "a.yaml", "--model.net.init_args.width", "4"]
    assert args[4] == "--model.inner=qgtrain.attacks.PGD"


def test_main_job_with_a_tiny_run_limit(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`train.py --inner pqgd --steps 10` (cut to 3 steps of a tiny model) writes checkpoints, TensorBoard
    logs and the resolved config under the run name that encodes dataset, attack, steps and b."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QGTRAIN_DATA", str(data_root))
    # One validation batch (val_size <= eval_batch_size). Note that jsonargparse reads
    # `--trainer.limit_train_batches 1` as 1.0, i.e. 100%: limits here are >= 2.
    tiny = "--model tiny_cnn --epochs 1 --data.init_args.val_size 200 --eval-size 50 --eval-steps 2 --trainer.enable_progress_bar false".split()
    assert main(["--inner", "pqgd", "--steps", "10", *tiny, "--trainer.limit_train_batches", "3"]) == 0
    run = tmp_path / "checkpoints" / "mnist-pqgd-k10-b100"
    assert sorted(p.name for p in run.iterdir()) == ["best.ckpt", "last.ckpt"]
    log_dir = tmp_path / "logs" / "mnist-pqgd-k10-b100" / "version_0"
    saved = yaml.safe_load((log_dir / "config.yaml").read_text())
    assert saved["model"]["inner"]["init_args"]["steps"] == 10
    assert list(log_dir.glob("events.out.tfevents.*"))
    ckpt = torch.load(run / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3 and ckpt["qgtrain"]["net"]["name"] == "tiny_cnn"
    # A second run with the same name never overwrites the first one's checkpoints.
    assert main(["--inner", "pqgd", "--steps", "10", *tiny, "--trainer.limit_train_batches", "2"]) == 0
    assert (
        torch.load(tmp_path / "checkpoints" / "mnist-pqgd-k10-b100-v1" / "last.ckpt", weights_only=True)[
            "global_step"
        ]
        == 2
    )
    assert torch.load(run / "last.ckpt", weights_only=True)["global_step"] == 3


def test_arguments_for_a_null_inner_attack_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A config with `inner: null` plus `--steps` must not silently train against the base class."""
    null_inner = tmp_path / "null.yaml"
    null_inner.write_text("model:\n  inner: null\n")
    config = str(Path(__file__).resolve().parents[1] / "configs" / "mnist.yaml")
    with pytest.raises(SystemExit) as info:
        main(
            [
                "--config",
                config,
                "--config",
                str(null_inner),
                "--steps",
                "10",
                "--checkpoint_root",
                str(tmp_path),
            ]
        )
    assert info.value.code == 2
    assert "no attack class" in capsys.readouterr().err
