"""The min-max LightningModule: every inner attack trains, the attack sees eval mode, real learning, DDP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from qgtrain.attacks import PGD, Attack, attack_for_budget
from qgtrain.evaluation import adversarial_correct
from qgtrain.models import TinyCNN
from qgtrain.training import AdversarialTraining, lr_lambda, quiet_trainer
from tests.helpers import REPO, load_mnist_tensors


def _loader(n: int = 64, batch_size: int = 16, offset: int = 0) -> DataLoader:
    x, y = load_mnist_tensors(n, offset=offset)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class ModeSpy(PGD):
    """PGD that records the network's mode when it is called."""

    seen_training: list[bool]

    def __call__(self, model, x, y):
        self.seen_training.append(model.training)
        return super().__call__(model, x, y)


@pytest.mark.parametrize("inner", ["none", "fgsm_rs", "nfgsm", "pgd", "pqgd", "blob", "blob_qg", "apgd_ce"])
def test_fast_dev_run_trains_with_every_inner_attack(inner: str) -> None:
    torch.manual_seed(0)
    attack = None if inner == "none" else attack_for_budget(inner, 0.3, 2)
    module = AdversarialTraining(TinyCNN(width=4), attack, val_attack=PGD(eps=0.3, alpha=0.1, steps=2))
    before = [p.detach().clone() for p in module.net.parameters()]
    trainer = quiet_trainer(fast_dev_run=2)
    trainer.fit(module, _loader(), _loader(offset=64))
    assert any(not torch.equal(a, b) for a, b in zip(before, module.net.parameters(), strict=True))
    metrics = trainer.callback_metrics
    assert (
        torch.isfinite(metrics["train/loss"])
        and 0 <= metrics["val/adv_acc"] <= metrics["val/clean_acc"] + 1e-6
    )


def test_attack_runs_in_eval_mode_and_mode_is_restored() -> None:
    spy = ModeSpy(eps=0.3, alpha=0.1, steps=1)
    spy.seen_training = []
    net = TinyCNN(width=4)
    net.train()
    module = AdversarialTraining(net, spy)
    x, y = load_mnist_tensors(8)
    module.craft(x, y)
    assert spy.seen_training == [False] and net.training
    module_train_mode = AdversarialTraining(net, spy, attack_in_eval_mode=False)
    module_train_mode.craft(x, y)
    assert spy.seen_training[-1] is True and net.training


def test_mixed_objective_weights_clean_and_adversarial_losses() -> None:
    torch.manual_seed(0)
    net = TinyCNN(width=4).eval()
    x, y = load_mnist_tensors(16)

    class Shift(Attack):
        def __call__(self, model, x, y):
            return (x + 0.1).clamp(0, 1)

    module = AdversarialTraining(net, Shift(eps=0.1), objective="mixed", clean_weight=0.25)
    module.log = lambda *a, **k: None  # no trainer attached
    loss = module.training_step((x, y), 0)
    ce = torch.nn.functional.cross_entropy
    expected = 0.25 * ce(net(x), y) + 0.75 * ce(net((x + 0.1).clamp(0, 1)), y)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("every", [1, 3])
def test_clean_accuracy_is_measured_on_every_nth_batch(every: int) -> None:
    module = AdversarialTraining(
        TinyCNN(width=4), PGD(eps=0.3, alpha=0.1, steps=1), clean_accuracy_every_n_batches=every
    )
    measured: list[int] = []
    eval_logits = module._eval_logits
    module._eval_logits = lambda x: measured.append(x.shape[0]) or eval_logits(x)
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0)
    trainer.fit(module, _loader(96, 16))  # 6 batches
    assert len(measured) == (6 if every == 1 else 2)  # batches 0 and 3 when every=3
    assert 0.0 <= float(trainer.callback_metrics["train/clean_acc"]) <= 1.0
    with pytest.raises(ValueError, match="clean_accuracy_every_n_batches"):
        AdversarialTraining(TinyCNN(width=4), clean_accuracy_every_n_batches=0)


def test_channels_last_option_stores_the_network_so_and_its_checkpoint_loads_anywhere(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = AdversarialTraining(TinyCNN(width=4), PGD(eps=0.3, alpha=0.1, steps=2), channels_last=True)
    conv = module.net.features[3].weight  # 4 -> 8 channels: the two layouts differ
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, _loader(64, 16))
    assert not module.net.features[3].weight.is_contiguous()  # Adam's updates keep the layout
    trainer.save_checkpoint(tmp_path / "cl.ckpt")
    plain = TinyCNN(width=4)
    state = torch.load(tmp_path / "cl.ckpt", weights_only=True)["state_dict"]
    plain.load_state_dict({k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")})
    assert plain.features[3].weight.is_contiguous()
    x, _ = load_mnist_tensors(8)
    torch.testing.assert_close(plain.eval()(x), module.net.eval()(x))


def test_lr_schedules() -> None:
    piecewise = lr_lambda("piecewise", 100)
    assert [piecewise(s) for s in (0, 49, 50, 74, 75, 99)] == [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    onecycle = lr_lambda("onecycle", 100)
    values = [onecycle(s) for s in range(100)]
    assert max(values) == pytest.approx(1.0) and values.index(max(values)) == 39 and values[-1] < 0.02
    with pytest.raises(ValueError, match="onecycle"):
        lr_lambda("cosine", 10)


def test_eps_warmup_ramps_the_inner_radius() -> None:
    module = AdversarialTraining(TinyCNN(width=4), PGD(eps=0.3, alpha=0.03, steps=2), eps_warmup_epochs=1.0)
    radii: list[float] = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            radii.append(pl_module.current_inner().eps)

    quiet_trainer(max_epochs=2, callbacks=[Record()], limit_val_batches=0).fit(module, _loader(64, 16))
    assert radii[0] == pytest.approx(0.3 / 4) and radii[3] == pytest.approx(0.3)
    assert radii == sorted(radii) and radii[-1] == pytest.approx(0.3)


@pytest.mark.parametrize(
    ("eps", "clip", "warns"),
    [(0.4, (0.0, 1.0), False), (0.5, (0.0, 1.0), True), (0.5, (-1.0, 1.0), False), (1.0, (-1.0, 1.0), True)],
)
def test_a_training_radius_that_reaches_the_mid_range_image_warns(
    eps: float, clip: tuple[float, float], warns: bool, recwarn: pytest.WarningsRecorder
) -> None:
    AdversarialTraining(TinyCNN(width=4), PGD(eps=eps, alpha=0.1, steps=2, clip=clip))
    messages = [str(w.message) for w in recwarn if "half the input range" in str(w.message)]
    assert len(messages) == warns
    if warns:
        assert f"constant {(clip[0] + clip[1]) / 2:g} image" in messages[0]


def test_short_pgd_training_learns_and_gains_robustness(data_root: Path) -> None:
    """One short epoch on 4000 real MNIST images: clean accuracy far above chance, robust accuracy
    above an untrained network's, measured with the same attack on held-out test images."""
    torch.manual_seed(0)
    x, y = load_mnist_tensors(4000)
    x_test, y_test = load_mnist_tensors(500, train=False)
    eps = 0.1
    evaluate = PGD(eps=eps, alpha=0.025, steps=10)
    net = TinyCNN(width=8)
    untrained = adversarial_correct(net, evaluate, [(x_test, y_test)]).float().mean().item()
    module = AdversarialTraining(
        net, PGD(eps=eps, alpha=0.04, steps=3), optimizer=lambda p: torch.optim.Adam(p, lr=2e-3)
    )
    loader = DataLoader(TensorDataset(x, y), batch_size=50, shuffle=True)
    quiet_trainer(max_epochs=1, limit_val_batches=0).fit(module, loader)
    with torch.no_grad():
        clean = (net.eval()(x_test).argmax(1) == y_test).float().mean().item()
    robust = adversarial_correct(net, evaluate, [(x_test, y_test)]).float().mean().item()
    assert clean > 0.7
    assert robust > untrained + 0.2


@pytest.mark.slow
def test_ddp_two_cpu_processes_train_and_write_one_checkpoint(data_root: Path, tmp_path: Path) -> None:
    env = {**os.environ, "QGTRAIN_DATA": str(data_root), "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        "--config",
        str(REPO / "configs" / "mnist_fast.yaml"),
        "--inner",
        "pgd",
        "--steps",
        "2",
        "--epochs",
        "1",
        "--devices",
        "2",
        "--strategy",
        "ddp",
        "--trainer.accelerator",
        "cpu",
        "--data.init_args.train_subset",
        "400",
        "--data.init_args.val_size",
        "200",
        "--data.init_args.eval_batch_size",
        "50",
        "--trainer.limit_val_batches",
        "2",
        "--model.net.init_args.width",
        "4",
        "--checkpoint_root",
        str(tmp_path / "ck"),
        "--log_root",
        str(tmp_path / "lg"),
        "--run-name",
        "ddp",
        "--trainer.enable_progress_bar",
        "false",
    ]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "ck" / "ddp").iterdir()) == ["best.ckpt", "last.ckpt"]
    ckpt = torch.load(tmp_path / "ck" / "ddp" / "last.ckpt", weights_only=True)
    # 400 examples / (2 ranks x 100 per batch) = 2 optimizer steps on each rank, in lockstep.
    assert ckpt["global_step"] == 2 and ckpt["epoch"] == 0
    assert ckpt["qgtrain"]["inner"]["name"] == "pgd"
