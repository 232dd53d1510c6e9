"""train.py: short flags map onto the LightningCLI config; the main job writes checkpoints, logs and config."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import WeightAveraging

from qgtrain.attacks import attack_class
from qgtrain.callbacks import RobustnessEvaluation
from qgtrain.cli.aliases import SHORT_FLAGS
from qgtrain.cli.train import QGTrainCLI, build_cli, main
from qgtrain.training.trainer import EPOCH_NUMBERING
from qgtrain.training.weight_averaging import ExponentialMovingAverage
from tests.helpers import REFUSED_RUN_ARGS, call_main, error_lines, no_training, output_roots

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def resolved_config(capsys: pytest.CaptureFixture, *argv: str) -> dict:
    with pytest.raises(SystemExit) as info:
        main([*argv, "--print_config"])
    assert info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def usage_error(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *argv: str
) -> str:
    """The one stderr line of a refused ``train.py`` (exit 2), checking that no training started and
    nothing was written, neither under the output roots nor in the working folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(L.Trainer, "fit", no_training)
    with pytest.raises(SystemExit) as info:
        main([*argv, *output_roots(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("train.py: error: "), err
    assert "usage:" not in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []  # no logs/, checkpoints/ or probe files
    return lines[0]


def built(tmp_path: Path, *argv: str):
    """The CLI of ``train.py argv`` with model, data, callbacks and trainer built (nothing fitted)."""
    return build_cli([*argv, *output_roots(tmp_path)])


def test_main_job_flags_resolve_to_the_configs_recipe(capsys: pytest.CaptureFixture) -> None:
    """The main job trains with 10-step PQGD (b 100, alpha eps / steps) at eps 0.4, beyond the
    0.3 that validation, the monitor (no radius of its own) and evaluate.py attack at; plain
    ``train.py`` is the same run."""
    cfg = resolved_config(capsys, "--inner", "pqgd", "--steps", "10")
    inner = cfg["model"]["inner"]
    assert inner["class_path"] == "qgtrain.attacks.PQGD"
    assert inner["init_args"].items() >= {"steps": 10, "eps": 0.4, "alpha": pytest.approx(0.04), "b": 100}.items()
    assert cfg["model"]["val_attack"]["init_args"]["eps"] == 0.3 and cfg["robustness"]["eps"] is None
    assert resolved_config(capsys)["model"] == cfg["model"]
    assert cfg["model"]["net"]["class_path"] == "qgtrain.models.MadryMNIST"
    assert cfg["data"]["class_path"] == "qgtrain.data.MNISTDataModule"
    assert cfg["trainer"]["inference_mode"] is False


def test_switching_inner_attack_resets_class_specific_arguments(
    capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    pgd = resolved_config(capsys, "--inner", "pgd", "--steps", "40")["model"]["inner"]
    assert pgd["class_path"] == "qgtrain.attacks.PGD" and pgd["init_args"]["b"] == 1
    assert pgd["init_args"]["steps"] == 40
    fgsm = resolved_config(capsys, "--inner", "fgsm_rs")["model"]["inner"]["init_args"]
    assert fgsm["steps"] == 1 and fgsm["alpha"] == attack_class("fgsm_rs").default_alpha(0.3)  # its rule, resolved
    none = resolved_config(capsys, "--inner", "none")["model"]["inner"]
    assert none is None
    # Standard training stays standard when a radius is given (for validation and evaluation).
    none_eps = resolved_config(capsys, "--inner", "none", "--eps", "0.2")
    assert none_eps["model"]["inner"] is None
    # The robustness evaluation has no radius of its own (eps: null): it takes the validation radius.
    assert (
        none_eps["model"]["val_attack"]["init_args"]["eps"] == 0.2 and none_eps["robustness"]["eps"] is None
    )
    cli = built(tmp_path, "--net", "tiny_cnn", "--inner", "none", "--eps", "0.2")
    robustness = next(c for c in cli.trainer.callbacks if isinstance(c, RobustnessEvaluation))
    assert robustness.resolve_eps(cli.model) == 0.2


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
        "--net",
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


# Each row: argv after REFUSED_RUN_ARGS, and the fragments its one error line must contain.
@pytest.mark.parametrize("name", ["fgsm", "fgsm_rs", "nfgsm", "pgd", "pqgd", "blob_qg", "apgd_t", "square"])
def test_inner_switch_shows_every_argument_of_the_new_class(name: str, capsys: pytest.CaptureFixture) -> None:
    """``--inner NAME`` resolves to exactly the class's constructor arguments (subclasses that pass
    ``**kwargs`` up show their parents' too), with the class's own ``b`` where it takes one."""
    cls = attack_class(name)
    init_args = resolved_config(capsys, "--inner", name)["model"]["inner"]["init_args"]
    assert set(init_args) == set(cls.constructor_defaults()), name
    if "b" in init_args:
        assert init_args["b"] == cls.default_b


def test_inner_resets_alpha_and_b_only_when_it_changes_the_configs_class(
    capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    """The config's alpha and b were chosen for its own class: a class other than the config's takes
    its own b and step-size rule (PGD's 2.5 eps / steps: 0.075 at eps 0.3 and 10 steps); naming the
    config's own class keeps the config's values (mnist.yaml's alpha: null, PQGD's eps / steps), and
    a given --alpha wins over both."""
    config = yaml.safe_load((CONFIGS / "mnist.yaml").read_text())["model"]["inner"]
    assert config["class_path"] == "qgtrain.attacks.PQGD" and config["init_args"]["alpha"] is None

    def inner(*argv: str) -> dict:
        return resolved_config(capsys, *argv)["model"]["inner"]["init_args"]

    assert inner("--inner", "pqgd", "--steps", "10").items() >= {"alpha": 0.04, "b": 100, "steps": 10}.items()
    assert built(tmp_path, "--inner", "pqgd", "--steps", "10").model.inner.alpha == pytest.approx(0.04)
    pgd = inner("--inner", "pgd", "--steps", "10")
    assert pgd["alpha"] == pytest.approx(0.075) and pgd["b"] == 1
    assert inner("--inner", "pgd", "--alpha", "0.05")["alpha"] == 0.05
    fast = ("--config", str(CONFIGS / "mnist_fast.yaml"))  # a PQGD config with its own alpha: kept
    assert inner(*fast, "--inner", "pqgd", "--b", "200").items() >= {"alpha": 0.075, "b": 200}.items()
    assert inner(*fast, "--inner", "pgd")["alpha"] == 0.075 and inner(*fast, "--inner", "pgd")["b"] == 1  # PGD's rule


def test_another_inner_class_trains_at_the_threat_models_radius(capsys: pytest.CaptureFixture) -> None:
    """mnist.yaml's PQGD trains at eps 0.4, beyond the 0.3 it is validated at: that radius is part of
    its recipe, so ``--inner pgd`` (Madry's PGD-40, say) trains at the validation attack's 0.3, as
    ``b`` and ``alpha`` reset; --inner pqgd keeps 0.4. Controls: --eps before or after --inner wins,
    and Fashion-MNIST's config (no overshoot) keeps its 0.2."""

    def radius(*argv: str) -> float:
        return resolved_config(capsys, *argv)["model"]["inner"]["init_args"]["eps"]

    assert radius("--inner", "pgd", "--steps", "40", "--alpha", "0.01") == 0.3
    assert radius("--inner", "nfgsm") == 0.3
    assert radius("--inner", "pqgd", "--steps", "5") == 0.4
    assert radius("--eps", "0.25", "--inner", "pgd") == 0.25 and radius("--inner", "pgd", "--eps", "0.25") == 0.25
    assert radius("--dataset", "fashion_mnist", "--inner", "pgd") == 0.2


def test_print_config_shows_the_step_size_the_rule_gives_after_every_flag(
    capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    """``alpha: null`` is printed (and saved) as the number the class's rule gives once every flag is
    applied: PQGD's eps / steps with the --steps and --eps given after --inner, the number the built
    attack uses. Controls: a given --alpha and the config's own PGD alpha are kept, not the rule's."""

    def alpha(*argv: str) -> float:
        return resolved_config(capsys, *argv)["model"]["inner"]["init_args"]["alpha"]

    assert alpha("--inner", "pqgd", "--steps", "10") == pytest.approx(0.04)
    assert alpha("--inner", "pqgd", "--steps", "20", "--eps", "0.2") == pytest.approx(0.01)  # after --inner
    assert alpha("--steps", "20", "--inner", "pqgd") == pytest.approx(0.02)
    assert built(tmp_path, "--inner", "pqgd", "--steps", "20").model.inner.alpha == pytest.approx(0.02)
    assert alpha("--inner", "pqgd", "--alpha", "0.05") == 0.05  # control: given, kept
    fast = ("--config", str(CONFIGS / "mnist_fast.yaml"))
    assert alpha(*fast, "--inner", "pqgd", "--steps", "20") == 0.075  # control: the config's own value, kept
    val_attack = resolved_config(capsys, "--model.val_attack.init_args.alpha", "null")["model"]["val_attack"]
    assert val_attack["init_args"]["alpha"] == pytest.approx(2.5 * 0.3 / 10)  # PGD's rule, the same way


def test_inner_switch_takes_the_new_classs_start(capsys: pytest.CaptureFixture) -> None:
    """configs/mnist.yaml starts PQGD in the ball (random_start: true); --inner rgd takes RGD's own
    start at x. Controls: --inner pqgd (the config's class) keeps the config's start, and a
    random_start given after the switch wins."""
    config = yaml.safe_load((CONFIGS / "mnist.yaml").read_text())["model"]["inner"]["init_args"]
    assert config["random_start"] is True

    def start(*argv: str) -> bool:
        return resolved_config(capsys, *argv)["model"]["inner"]["init_args"]["random_start"]

    assert start("--inner", "rgd") is False
    assert start("--inner", "pqgd") is True
    assert start("--inner", "rgd", "--model.inner.init_args.random_start", "true") is True


BAD_TRAIN_ARGS = [
    (["--eps", "-0.1"], ("--eps", "(0, 1]")),
    (["--eps", "0"], ("--eps", "(0, 1]")),
    (["--eps", "1.5"], ("--eps must be in (0, 1]",)),
    (["--steps", "0"], ("--steps must be an integer >= 1",)),  # Attack.__init__'s check, flag named
    (["--b", "0"], ("--b", ">= 1")),
    (["--b", "2.5"], ("--b: Expected a <class 'int'>",)),  # jsonargparse's type check
    (["--alpha", "0"], ("--alpha must be > 0",)),
    (["--alpha", "-1"], ("--alpha", "> 0")),
    (["--inner", "pgdx"], ("--inner must be one of none, fgsm", "pqgd")),
    (["--inner", "none", "--steps", "3"], ("--steps needs an inner attack",)),
    (["--net", "vgg16"], ("--net", "tiny_cnn")),
    (["--dataset", "svhn"], ("--dataset must be one of mnist", "cifar10")),
    (["--devices", "999"], ("--devices 999", "available")),
    (["--devices", "two"], ("--devices", "'auto'")),
    (["--eval-steps", "0"], ("--eval-steps must be an integer >= 1",)),  # RobustnessEvaluation's check
    (["--batch-size", "0"], ("--batch-size must be >= 1",)),  # the data module's check
    (["--num-nodes", "0"], ("--num-nodes must be a positive integer",)),  # Lightning's check
    (["--ckpt-every-steps", "-1"], ("--ckpt-every-steps must be an integer >= 0",)),  # StepCheckpoint's
    (["--ema", "--ema-decay", "1.5"], ("--ema-decay must be a number in [0, 1), got 1.5",)),  # the EMA's
    (["--ema", "--ema-start-step", "-1"], ("--ema-start-step must be an integer >= 0",)),
    (["--ema-decay", "0.99"], ("--ema-decay", "add --ema")),  # it would shape an average nobody keeps
    # weights-only checkpoints skip the callbacks' on_save_checkpoint, where the average is written
    (["--ema", "--checkpoint.save_weights_only=true"], ("save_weights_only drops the average --ema",)),
    (["--awp", "-0.1"], ("--awp must be a number >= 0",)),  # AdversarialTraining's check
    # values from YAML / dotted keys reach the classes' own checks: one line, the class's message
    (["--model.inner.init_args.eps=-1"], ("eps", "(0, 1]")),
    (["--model.inner.init_args.steps=0"], ("steps", ">= 1")),
    (["--inner", "pqgd", "--steps", "0"], ("--steps must be an integer >= 1",)),  # not eps / 0 in the rule
    (["--model.inner.init_args.b=0"], ("b must", ">= 1")),
    (["--data.init_args.batch_size=0"], ("batch_size", ">= 1")),
    # jsonargparse's own errors: one line naming the key and the allowed values
    (
        ["--model.lr_schedule=bogus"],
        ('Parser key "model.lr_schedule"', "'constant', 'piecewise', 'onecycle'"),
    ),
    (["--model.objective=minimax"], ('Parser key "model.objective"', "'madry', 'mixed'")),
    # an argument of other attacks but not of the chosen one: named, no did-you-mean of itself
    (["--inner", "square", "--b", "3"], ("init_args.b is not an argument of Square",)),
    (["--model.inner.init_args.stpes=3"], ("did you mean --model.inner.init_args.steps?",)),
    # a misspelt key in a config (a file or a dict value): the key and the closest one
    (['--trainer={"max_epoch": 3}'], ("trainer.max_epoch (set by a config) is not an option; did you mean trainer.max_epochs?",)),
    (['--model={"lr_schedul": "constant"}'], ("did you mean model.lr_schedule?",)),
    # a flag of the inner attack before --inner none, and inner-attack keys with no attack class
    (["--steps", "3", "--inner", "none"], ("--steps needs an inner attack, but --inner is none",)),
    (["--inner", "none", "--model.inner.init_args.steps=3"], ("model.inner has arguments but no attack class",)),
    # a class's refusal quoting the typed value gets the flag in front
    (["--eval-attack", "cw"], ("--eval-attack: unknown attack 'cw'",)),
    (["--strategy", "bogus"], ("--strategy: You selected an invalid strategy name",)),
]


@pytest.mark.parametrize(
    ("argv", "fragments"), BAD_TRAIN_ARGS, ids=[" ".join(argv) for argv, _ in BAD_TRAIN_ARGS]
)
def test_bad_arguments_are_one_line_errors_exit_2_nothing_written(
    argv: list[str],
    fragments: tuple[str, ...],
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Each value is checked once, by the class that uses it; the line names the flag typed (or the
    key) and what is allowed."""
    line = usage_error(capsys, monkeypatch, tmp_path, *REFUSED_RUN_ARGS, *argv)
    assert all(fragment in line for fragment in fragments), line


def test_a_short_flag_typed_last_without_a_value_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """``--steps`` at the end of the command: its one line, exit 2, nothing written."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(L.Trainer, "fit", no_training)
    with pytest.raises(SystemExit) as info:
        main([*output_roots(tmp_path), "--steps"])
    assert info.value.code == 2
    assert error_lines(capsys.readouterr().err) == ["train.py: error: --steps needs a value"]
    assert list(tmp_path.iterdir()) == []


def test_gpu_request_without_gpu_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Lightning parses accelerator and devices; its refusals come out as one line naming both."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(L.Trainer, "fit", no_training)
    monkeypatch.chdir(tmp_path)
    argv = [*REFUSED_RUN_ARGS, *output_roots(tmp_path), "--trainer.accelerator=gpu"]
    assert call_main(main, argv) == 2
    assert error_lines(capsys.readouterr().err) == [
        "train.py: error: --trainer.accelerator gpu --devices auto: No supported gpu backend found!; "
        "'auto' picks what this machine has"
    ]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # 2 GPUs: 3 is too many, 2 is fine
    monkeypatch.setattr(QGTrainCLI, "check_before_fit", lambda self: None)
    gpu = [*argv, "--devices"]
    assert call_main(main, [*gpu, "3"]) == 2
    assert (
        "--devices 3: You requested gpu: [0, 1, 2] But your machine only has: [0, 1]"
        in capsys.readouterr().err
    )
    for fine in ("2", "0,1"):
        with pytest.raises(AssertionError, match="training started"):
            main([*gpu, fine])
    assert call_main(main, [*gpu, "0,2"]) == 2
    assert error_lines(capsys.readouterr().err)[-1].endswith(
        "only has: [0, 1]; 'auto' picks what this machine has"
    )


def test_a_misspelt_flag_is_one_line_with_the_closest_valid_one(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    line = usage_error(capsys, monkeypatch, tmp_path, "--stpes", "10")
    assert line == "train.py: error: unrecognized argument --stpes; did you mean --steps?"
    line = usage_error(capsys, monkeypatch, tmp_path, "--robustness.stpes=3")
    assert line.endswith("did you mean --robustness.steps?")
    assert "unrecognized argument --zzzz" in usage_error(capsys, monkeypatch, tmp_path, "--zzzz", "1")
    # Arguments of a class chosen in the config (the inner attack here) are suggested too.
    line = usage_error(capsys, monkeypatch, tmp_path, "--model.inner.init_args.stpes=3")
    assert line.endswith("did you mean --model.inner.init_args.steps?")


def test_eps_is_linked_one_way() -> None:
    """``--eps`` sets the training and validation radii; the robustness evaluation follows the
    validation radius (``eps: null`` in every config) instead of being set a third time."""
    eps = next(row for row in SHORT_FLAGS if row.flag == "--eps")
    assert eps.keys == ("model.inner.init_args.eps", "model.val_attack.init_args.eps")
    for config in CONFIGS.glob("*.yaml"):
        assert yaml.safe_load(config.read_text())["robustness"].get("eps") is None, config.name


def test_help_starts_with_the_short_flags_and_their_resolved_defaults(
    capsys: pytest.CaptureFixture,
) -> None:
    def help_text(*argv: str) -> str:
        with pytest.raises(SystemExit) as info:
            main([*argv, "--help"])
        assert info.value.code in (0, None)
        return capsys.readouterr().out

    text = help_text()
    first = text.splitlines()[: 2 * len(SHORT_FLAGS) + 1]
    assert first[0].startswith("Short flags") and "mnist.yaml" in first[0]
    table = "\n".join(first)
    for shown in ("--dataset mnist ", "--inner pqgd ", "--steps 10 ", "--eps 0.4/0.3 ", "--net madry_mnist "):
        assert shown in table, shown  # --eps: the inner attack's radius, then validation's (they differ)
    assert "sets model.inner.init_args.eps, model.val_attack.init_args.eps" in table
    # The values come from the resolved config, so another config file shows its own.
    fast = "\n".join(help_text("--config", str(CONFIGS / "mnist_fast.yaml")).splitlines()[:20])
    assert "--net tiny_cnn " in fast and "mnist_fast.yaml" in fast
    # --model.net lists qgtrain's networks, not every torch.nn class.
    assert "torch.nn" not in text and "qgtrain.models.TinyCNN" in text
    # Every option of qgtrain's own classes has a description before its type.
    options = re.findall(r"^  (--(?:model|data|robustness|visualization)\.\S+)[^\n]*\n?\s*(.*)", text, re.M)
    own = [
        (flag, rest) for flag, rest in options if not flag.startswith(("--model.optimizer", "--data.help"))
    ]
    assert len(own) > 20
    undocumented = [flag for flag, rest in own if rest.startswith(("(type", "(required"))]
    assert undocumented == [], undocumented


def test_ema_and_awp_flags_set_their_keys_show_in_help_and_name_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``--ema`` installs the averaging callback first, ``--awp G`` sets model.awp_gamma; both are in
    --print_config, the --help table and the run name. Control: without them, none of it."""
    argv = ["--inner", "pqgd", "--steps", "10"]
    cli = built(tmp_path, *argv, "--ema", "--awp", "0.005", "--model.objective", "mart")
    assert cli.run_name == "mnist-madry_mnist-pqgd-k10-b100-mart-awp0.005-ema"
    ema = cli.trainer.callbacks[0]
    assert isinstance(ema, ExponentialMovingAverage) and (ema.decay, ema.start_step) == (0.999, 0)
    assert cli.model.hparams.awp_gamma == 0.005
    plain = built(tmp_path, *argv)
    assert plain.run_name == "mnist-madry_mnist-pqgd-k10-b100"  # the main job's name is unchanged
    assert not any(isinstance(c, WeightAveraging) for c in plain.trainer.callbacks)
    assert plain.model.hparams.awp_gamma == 0

    cfg = resolved_config(capsys, "--ema", "--ema-decay", "0.99", "--ema-start-step", "500", "--awp", "0.01")
    shown = cfg["ema"], cfg["ema_decay"], cfg["ema_start_step"], cfg["model"]["awp_gamma"]
    assert shown == (True, 0.99, 500, 0.01)
    default = resolved_config(capsys)
    assert (default["ema"], default["ema_decay"], default["ema_start_step"]) == (False, 0.999, 0)
    assert resolved_config(capsys, "--ema", "--no_ema")["ema"] is False
    with pytest.raises(SystemExit):
        main(["--ema", "--awp", "0.005", "--help"])
    table = capsys.readouterr().out.split("\n\n", 1)[0]
    rows = ("--ema true ", "--ema-decay 0.999 ", "--ema-start-step 0 ", "--awp 0.005 ", "model.awp_gamma")
    assert all(row in table for row in rows), table


def test_run_names_show_the_model(tmp_path: Path) -> None:
    """The TinyCNN quick config and the full MadryMNIST run are told apart by name."""
    full = built(tmp_path, "--inner", "pqgd", "--steps", "10")
    fast = built(tmp_path, "--config", str(CONFIGS / "mnist_fast.yaml"))
    assert full.run_name == "mnist-madry_mnist-pqgd-k10-b100"
    assert fast.run_name == "mnist-tiny_cnn-pqgd-k10-b100"
    assert built(tmp_path, "--net", "tiny_cnn", "--inner", "none").run_name == "mnist-tiny_cnn-standard"
    # ATTA, TRADES and free AT's replays are other methods than the inner attack alone
    atta = built(
        tmp_path, "--inner", "pgd", "--steps", "1", "--model.atta", "true", "--model.objective", "trades"
    )
    assert atta.run_name == "mnist-madry_mnist-pgd-k1-b1-atta-trades"
    assert built(tmp_path, "--inner", "free", "--replays", "8", "--epochs", "8").run_name == "mnist-madry_mnist-free-k1-b1-m8"


@pytest.mark.parametrize(
    ("argv", "status", "message"),
    [
        (["--data.init_args.val_size=100000"], 1, "leaves no training data"),
        (["--lr", "-1"], 2, "Invalid learning rate"),
    ],
)
def test_a_refused_run_writes_nothing(
    argv: list[str],
    status: int,
    message: str,
    data_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """Data and optimizer arguments are checked before Lightning creates logs/<run>/version_0."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QGTRAIN_DATA", str(data_root))
    try:
        code = main(["--net", "tiny_cnn", "--data.init_args.train_subset=100", *argv])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == status and message in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []  # no logs/, checkpoints/


def test_flags_apply_in_command_line_order_as_the_keys_they_set(capsys: pytest.CaptureFixture) -> None:
    """A short flag does what its long key does at its place: a later key or config file wins, and
    --inner resets only what no earlier flag set."""
    inner = "model.inner.init_args"
    late = resolved_config(capsys, "--steps", "7", f"--{inner}.steps=9")["model"]["inner"]["init_args"]
    assert late["steps"] == 9
    early = resolved_config(capsys, f"--{inner}.steps=9", "--steps", "7")["model"]["inner"]["init_args"]
    assert early["steps"] == 7
    kept = resolved_config(capsys, "--alpha", "0.05", "--b", "50", "--inner", "pqgd")["model"]["inner"]
    assert kept["class_path"] == "qgtrain.attacks.PQGD" and kept["init_args"]["alpha"] == 0.05
    assert kept["init_args"]["b"] == 50
    fast = resolved_config(capsys, "--config", str(CONFIGS / "mnist_fast.yaml"), "--eps", "0.2")
    assert fast["model"]["net"]["class_path"] == "qgtrain.models.TinyCNN"
    assert fast["model"]["inner"]["init_args"]["eps"] == 0.2


def test_main_job_with_a_tiny_run_limit(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """`train.py --inner pqgd --steps 10` (cut to 3 steps of a tiny model) writes checkpoints, TensorBoard
    logs and the resolved config under the run name that encodes dataset, attack, steps and b."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QGTRAIN_DATA", str(data_root))
    # One validation batch (val_size <= eval_batch_size); a whole-number limit counts batches
    # (train.py's BATCH_LIMITS, test_reliability.py::test_whole_number_trainer_limits_mean_batches).
    tiny = "--net tiny_cnn --epochs 1 --data.init_args.val_size 200 --eval-size 50 --eval-steps 2 --trainer.enable_progress_bar false".split()
    assert main(["--inner", "pqgd", "--steps", "10", *tiny, "--trainer.limit_train_batches", "3"]) == 0
    run = tmp_path / "checkpoints" / "mnist-tiny_cnn-pqgd-k10-b100"
    assert sorted(p.name for p in run.iterdir()) == ["best.ckpt", "last.ckpt"]
    # A finished run ends with a summary: best robust accuracy, both checkpoints, what to run next.
    summary = capsys.readouterr().out.splitlines()[-7:]
    summary, next_lines = summary[:5], summary[5:]
    best = torch.load(run / "best.ckpt", weights_only=True)
    score = best["callbacks"][next(k for k in best["callbacks"] if k.startswith("ModelCheckpoint"))][
        "best_model_score"
    ]
    assert summary == [
        f"run mnist-tiny_cnn-pqgd-k10-b100 finished: best robust/worst_acc = {float(score):.4f} at epoch 0 "
        f"({EPOCH_NUMBERING})",
        "  that is the per-example worst case of blob_qg-2, apgd_t-2 on 50 validation images: an upper bound; "
        "the evaluation below gives the figure to report",
        "  best: checkpoints/mnist-tiny_cnn-pqgd-k10-b100/best.ckpt",
        "  last: checkpoints/mnist-tiny_cnn-pqgd-k10-b100/last.ckpt",
        "  TensorBoard: tensorboard --logdir logs/mnist-tiny_cnn-pqgd-k10-b100",
    ]
    # What to run next is sized to this CPU: the quick check with its estimate, the full one beside it.
    best_path = "checkpoints/mnist-tiny_cnn-pqgd-k10-b100/best.ckpt"
    assert next_lines[0].startswith(
        f"  next: python evaluate.py --ckpt {best_path} --n 1000 --suite apgd_ce,apgd_t --attacks none   # at most "
    ), next_lines
    assert next_lines[1].startswith(f"  full evaluation (a GPU job): python evaluate.py --ckpt {best_path}   # at most ")
    log_dir = tmp_path / "logs" / "mnist-tiny_cnn-pqgd-k10-b100" / "version_0"
    saved = yaml.safe_load((log_dir / "config.yaml").read_text())
    assert saved["model"]["inner"]["init_args"]["steps"] == 10
    assert list(log_dir.glob("events.out.tfevents.*"))
    ckpt = torch.load(run / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3 and ckpt["qgtrain"]["net"]["name"] == "tiny_cnn"
    # A second run with the same name never overwrites the first one's checkpoints.
    assert main(["--inner", "pqgd", "--steps", "10", *tiny, "--trainer.limit_train_batches", "2"]) == 0
    assert (
        torch.load(
            tmp_path / "checkpoints" / "mnist-tiny_cnn-pqgd-k10-b100-v1" / "last.ckpt", weights_only=True
        )["global_step"]
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
    assert "--steps needs an inner attack, but model.inner is null" in capsys.readouterr().err


@pytest.mark.parametrize(
    "injected", [RuntimeError("injected"), ValueError("injected"), TypeError("injected")]
)
def test_an_unexpected_exception_at_start_up_is_a_bug_with_its_traceback(
    injected: Exception, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Only qgtrain's own refusals are one usage line; anything else keeps its traceback and says it
    is a bug (exit 1). Control: a real bad flag, in the same setting, is still one line."""
    from qgtrain import checkpoints

    def broken(*args, **kwargs):
        raise injected

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(L.Trainer, "fit", no_training)
    monkeypatch.setattr(checkpoints, "start_point", broken)
    assert call_main(main, [*REFUSED_RUN_ARGS, *output_roots(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and f"{type(injected).__name__}: injected" in err, err
    assert err.rstrip().splitlines()[-1].startswith("train.py: this is a bug in qgtrain"), err
    assert "train.py: error:" not in err
    assert call_main(main, [*REFUSED_RUN_ARGS, *output_roots(tmp_path), "--stpes", "3"]) == 2
    assert error_lines(capsys.readouterr().err) == [
        "train.py: error: unrecognized argument --stpes; did you mean --steps?"
    ]
