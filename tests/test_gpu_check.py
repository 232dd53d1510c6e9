"""benchmarks/gpu_check.py: its CPU half runs here (``--cpu-only --quick``); without a GPU and without
``--cpu-only`` it refuses in one line."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check as gpu_check_script
from tests.helpers import find_data_root


@pytest.fixture()
def gpu_check(monkeypatch: pytest.MonkeyPatch):
    """The script as a module (in process: no second torch start-up), with MNIST where found."""
    root = find_data_root()
    if root is not None:
        monkeypatch.setenv("QGTRAIN_DATA", str(root))
    return gpu_check_script


def _main(gpu_check, monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", [gpu_check.__file__, *args])
    return gpu_check.main()


def test_cpu_half_runs_every_section_and_reports_agreement(gpu_check, monkeypatch, tmp_path: Path) -> None:
    assert _main(gpu_check, monkeypatch, "--cpu-only", "--quick", "--out", str(tmp_path)) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    status = {s["name"]: s["status"] for s in report["sections"]}
    has_torchattacks = importlib.util.find_spec("torchattacks") is not None  # the bench extra
    assert status == {
        "tests": "skipped",
        "main_job": "ok" if find_data_root() else "skipped",
        "attacks": "ok" if has_torchattacks else "skipped",
        "ddp": "skipped",
    }
    if not has_torchattacks:
        return
    attacks = next(s for s in report["sections"] if s["name"] == "attacks")["details"]["rows"]
    assert [r["setting"] for r in attacks] == ["fp32 contiguous", "fp32 channels_last"]
    assert all(r["ratio"] > 0 for r in attacks)
    if find_data_root():  # the same seed and random start: ours and torchattacks agree per example
        assert all(r["agreement %"] >= 99.0 for r in attacks)
        main_job = next(s for s in report["sections"] if s["name"] == "main_job")["details"]["32-true"]
        assert main_job["train_batches"] == 3 and main_job["s_per_batch"] > 0


def test_without_a_gpu_it_asks_for_cpu_only(gpu_check, monkeypatch, capsys, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("the refusal exists only where no GPU is visible")
    with pytest.raises(SystemExit) as exit_info:
        _main(gpu_check, monkeypatch, "--quick", "--out", str(tmp_path))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: no CUDA GPU is visible: run on a GPU machine, or pass --cpu-only for the CPU half"
    ]
