"""evaluate.py --range: chunks of the test split, each in its own folder with the true indices,
``--skip-done`` for a loop that resumes, and ``--merge`` joining chunks per example into the whole set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qgtrain.cli.evaluate import main
from qgtrain.evaluation.runner import TensorBatches
from tests.helpers import call_main, error_lines

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's fixtures: data_dir, tiny_ckpt

# Square (random search) and the PQGD row draw from each batch's stream, so a chunk attacked under
# another batch's stream gives other per-example outcomes.
FAST = ["--batch-size", "50", "--steps", "3", "--targets", "2", "--queries", "40", "--eps", "0.15"]
FAST += ["--suite", "apgd_ce,square", "--attacks", "pqgd", "--threads", "1", "--device", "cpu"]
FAST += ["--no-masking-checks", "--quiet", "--name", "run"]


def evaluate(ckpt: Path, data: Path, out: Path, *extra: str) -> int:
    return call_main(
        main, ["--ckpt", str(ckpt), "--data-dir", str(data), "--out-dir", str(out), *FAST, *extra]
    )


def arrays(folder: Path) -> dict[str, np.ndarray]:
    with np.load(folder / "correctness.npz") as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def chunks(tiny_ckpt: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 150 test images in one run (``run``) and as chunks 0:50, 50:150 (``run_<range>``)."""
    out = tmp_path_factory.mktemp("chunks")
    assert evaluate(tiny_ckpt, data_dir, out, "--n", "150") == 0
    for chunk in ("0:50", "50:150"):
        assert evaluate(tiny_ckpt, data_dir, out, "--range", chunk) == 0
    return out


def test_a_chunk_holds_its_true_indices_and_draws_the_whole_runs_streams(
    chunks: Path, tiny_ckpt: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunk 50:150 is named for its range, records it, indexes its examples 50..149 and gives
    exactly the whole run's outcomes for them. Control: the same chunk attacked under the first
    batches' streams (as if it started at 0) gives other outcomes."""
    whole, chunk = arrays(chunks / "run"), arrays(chunks / "run_50-150")
    record = json.loads((chunks / "run_50-150" / "results.json").read_text())
    assert record["data"]["range"] == [50, 150] and record["results"]["n"] == 100
    assert np.array_equal(chunk["index"], np.arange(50, 150))
    for key in whole:
        assert np.array_equal(chunk[key], whole[key][50:]), key
    monkeypatch.setattr(TensorBatches, "first_batch_index", property(lambda self: 0))
    assert evaluate(tiny_ckpt, data_dir, tmp_path, "--range", "50:150") == 0
    control = arrays(tmp_path / "run_50-150")
    assert any(not np.array_equal(control[key], whole[key][50:]) for key in ("suite", "row0_run0"))


def test_merged_chunks_are_the_whole_run_with_each_parts_cost(chunks: Path, capsys) -> None:
    """--merge of the chunk folders: the whole run's per-example arrays and numbers, a row per part
    with its cost, and totals that add up. Control: the whole run merged alone is itself."""
    assert (
        main(["--merge", str(chunks / "run_50-150"), str(chunks / "run_0-50"), "--out-dir", str(chunks)]) == 0
    )
    out = capsys.readouterr().out
    merged, whole = arrays(chunks / "merged"), arrays(chunks / "run")
    assert set(merged) == set(whole)
    for key in whole:
        assert np.array_equal(merged[key], whole[key]), key
    record = json.loads((chunks / "merged" / "results.json").read_text())
    full = json.loads((chunks / "run" / "results.json").read_text())["results"]
    (evaluation,) = record["evaluations"]
    assert record["n"] == 150 and record["examples"] == "0:150"
    assert record["robust"]["correct"] == full["ensemble"]["correct"]
    assert [a["fooled"] for a in evaluation["suite"]["attacks"]] == [
        a["fooled"] for a in full["suite"]["attacks"]
    ]
    assert evaluation["rows"][0]["worst"] == full["rows"][0]["worst"]
    parts = evaluation["parts"]
    assert [p["examples"] for p in parts] == ["0:50", "50:150"]
    assert evaluation["cost"]["gradients"] == sum(p["cost"]["gradients"] for p in parts) > 0
    assert evaluation["cost"]["wall_seconds"] == pytest.approx(sum(p["wall_seconds"] for p in parts))
    assert str(chunks / "run_0-50") in out and "Total" in out
    assert "| Total | 0:150 |" in (chunks / "merged" / "results.md").read_text()
    assert main(["--merge", str(chunks / "run"), "--out-dir", str(chunks), "--name", "alone"]) == 0
    assert all(np.array_equal(arrays(chunks / "alone")[k], whole[k]) for k in whole)


def test_merge_refuses_parts_that_do_not_fit_in_one_line(
    chunks: Path, tiny_ckpt: Path, data_dir: Path, tmp_path: Path, capsys
) -> None:
    """Another eps, another checkpoint, disjoint chunks of other settings, an example that two chunks
    of one evaluation disagree on, a partial folder: status 2, one line, nothing written. Controls:
    the same overlap agreeing merges (the example is kept once), and a merge of the fitting parts."""
    out = tmp_path / "out"
    assert evaluate(tiny_ckpt, data_dir, tmp_path, "--range", "0:50", "--eps", "0.1") == 0
    assert evaluate(tiny_ckpt, data_dir, tmp_path, "--range", "50:100", "--seed", "1") == 0
    other_ckpt = tmp_path / "other.ckpt"
    checkpoint = torch.load(tiny_ckpt, weights_only=True)
    checkpoint["epoch"] = 4
    torch.save(checkpoint, other_ckpt)
    assert evaluate(other_ckpt, data_dir, tmp_path / "o", "--range", "0:50") == 0
    disagree = tmp_path / "disagree"
    disagree.mkdir()
    for name in ("results.json", "correctness.npz"):
        (disagree / name).write_bytes((chunks / "run_0-50" / name).read_bytes())
    flipped = arrays(disagree)
    flipped["robust"][0] = ~flipped["robust"][0]
    np.savez(disagree / "correctness.npz", **flipped)
    partial = tmp_path / "cut-partial"
    partial.mkdir()
    record = json.loads((chunks / "run_0-50" / "results.json").read_text())
    record["results"]["partial"] = True
    (partial / "results.json").write_text(json.dumps(record))
    (partial / "correctness.npz").write_bytes((chunks / "run_0-50" / "correctness.npz").read_bytes())
    first = str(chunks / "run_0-50")
    cases = {
        "eps": ([first, str(tmp_path / "run_0-50")], "eps 0.1 differs"),
        "checkpoint": ([first, str(tmp_path / "o" / "run_0-50")], "checkpoint sha256"),
        "settings": (
            [first, str(tmp_path / "run_50-100")],
            "share no example and differ in settings (seed 0 vs 1)",
        ),
        "overlap": ([first, str(disagree)], "both evaluate examples 0:1 with the same settings but disagree"),
        "partial": ([first, str(partial)], "an interrupted (partial) evaluation"),
    }
    for argv, fragment in cases.values():
        assert call_main(main, ["--merge", *argv, "--out-dir", str(out)]) == 2
        lines = error_lines(capsys.readouterr().err, "evaluate.py")
        assert len(lines) == 1 and lines[0].startswith("evaluate.py: error: argument --merge: "), lines
        assert fragment in lines[0], lines[0]
        assert not out.exists()
    twice = [first, str(chunks / "run_0-50" / "correctness.npz"), str(chunks / "run_50-150")]
    assert main(["--merge", *twice, "--out-dir", str(out)]) == 0
    assert np.array_equal(arrays(out / "merged")["index"], np.arange(150))


def test_skip_done_skips_a_finished_chunk_only(chunks: Path, tiny_ckpt: Path, data_dir: Path, capsys) -> None:
    """A loop rerun with --skip-done skips the finished chunk (no -v1). Controls: without the flag the
    rerun gets run_0-50-v1; a finished folder of other settings is refused, not skipped."""
    assert evaluate(tiny_ckpt, data_dir, chunks, "--range", "0:50", "--skip-done") == 0
    assert "already holds this evaluation; skipped (--skip-done)" in capsys.readouterr().out
    assert not (chunks / "run_0-50-v1").exists()
    assert evaluate(tiny_ckpt, data_dir, chunks, "--range", "0:50", "--skip-done", "--seed", "3") == 2
    lines = error_lines(capsys.readouterr().err, "evaluate.py")
    assert len(lines) == 1 and "argument --skip-done:" in lines[0] and "settings.seed 0 vs 3" in lines[0]
    assert evaluate(tiny_ckpt, data_dir, chunks, "--range", "0:50") == 0
    assert (chunks / "run_0-50-v1" / "results.json").exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--range", "50:10"], "argument --range: must be START:STOP with 0 <= START < STOP"),
        (["--range", "a:b"], "argument --range: must be START:STOP"),
        (["--range", "0:50", "--n", "10"], "argument --n: not allowed with argument --range"),
        (["--range", "25:75"], "argument --range: START 25 is not a multiple of --batch-size 50"),
        (["--range", "0:20000"], "argument --range: 20000 exceeds the"),
    ],
)
def test_bad_range_is_one_line(
    args: list[str], fragment: str, tiny_ckpt: Path, data_dir: Path, tmp_path: Path, capsys
) -> None:
    assert evaluate(tiny_ckpt, data_dir, tmp_path, *args) == 2
    lines = error_lines(capsys.readouterr().err, "evaluate.py")
    assert len(lines) == 1 and fragment in lines[0], lines
    assert list(tmp_path.iterdir()) == []
