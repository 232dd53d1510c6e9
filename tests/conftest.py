"""Fixtures shared by the tests: the data root (real MNIST when present), small tensors from it, a
tiny trained model and its checkpoint, one torch thread. Helpers that are not fixtures are in
``tests/helpers.py``."""

from __future__ import annotations

import os

# Tiny CPU models run fastest on one thread, and multi-process tests (DDP, subprocesses) must not
# oversubscribe the cores: set before torch is imported, inherited by subprocesses.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from qgtrain.models import TinyCNN  # noqa: E402
from tests.helpers import find_data_root, lightning_like_checkpoint, load_mnist_tensors, write_mnist  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = find_data_root()
    if root is None:
        pytest.skip("real MNIST not found: set QGTRAIN_DATA to a folder holding MNIST/raw")
    return root


@pytest.fixture(scope="session")
def mnist_small() -> tuple[torch.Tensor, torch.Tensor]:
    """512 held-out examples (real MNIST test split when present)."""
    return load_mnist_tensors(512, train=False)


@pytest.fixture(scope="session")
def trained_tiny_model() -> TinyCNN:
    """A TinyCNN trained normally for a few seconds on 3000 examples (clean accuracy well above chance)."""
    torch.manual_seed(0)
    x, y = load_mnist_tensors(3000, train=True)
    model = TinyCNN(dataset="mnist", width=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(3):
        order = torch.randperm(x.shape[0])
        for start in range(0, x.shape[0], 100):
            idx = order[start : start + 100]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    return model


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): on a
    shared 2-core machine two threads run the evaluation tests' small batches ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real MNIST when present, else a synthetic MNIST (load_mnist_tensors' separable bars) in idx format."""
    root = find_data_root()
    if root is not None:
        return root
    root = tmp_path_factory.mktemp("mnist_data")
    splits = {}
    for prefix, train in (("train", True), ("t10k", False)):
        x, y = load_mnist_tensors(300, train=train)
        splits[prefix] = ((x[:, 0] * 255).round(), y)
    write_mnist(root, splits)
    return root


@pytest.fixture(scope="module")
def tiny_ckpt(trained_tiny_model: TinyCNN, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lightning_like_checkpoint(trained_tiny_model, tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")
