"""evaluate.py's environment faults and names: a result name is one folder name, ``--merge`` of what is
not a result folder, ``--out-dir`` naming a file, an unwritable output folder found before any attack,
an unreadable data file; each one line, never a traceback. And Square honours a stop request."""

from __future__ import annotations

import builtins
import errno
import os
from pathlib import Path

import numpy as np
import pytest

import qgtrain.checkpoints.files as checkpoint_files
import qgtrain.cli.evaluate as evaluate_cli
from qgtrain.evaluation import session
from tests.helpers import call_main, error_lines

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's fixtures: data_dir, tiny_ckpt

FAST = ["--n", "20", "--batch-size", "20", "--steps", "2", "--suite", "apgd_ce", "--attacks", "none"]
FAST += ["--threads", "1", "--device", "cpu", "--no-masking-checks", "--quiet"]


def evaluate(ckpt: Path, data: Path, out: Path, *extra: str) -> int:
    argv = ["--ckpt", str(ckpt), "--data-dir", str(data), "--out-dir", str(out), *FAST, *extra]
    return call_main(evaluate_cli.main, argv)


def one_error_line(capsys: pytest.CaptureFixture) -> str:
    """The one line evaluate.py wrote, asserting that there is exactly one and no traceback."""
    stderr = capsys.readouterr().err
    lines = error_lines(stderr, "evaluate.py")
    assert len(lines) == 1 and "Traceback" not in stderr and "bug" not in stderr, stderr
    return lines[0]


def no_attacks(*args, **kwargs):
    raise AssertionError("the attacks ran")


@pytest.fixture(scope="module")
def finished(tiny_ckpt: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished evaluation in ``my-run``: the control of the refusals below (a plain name, a folder
    for --out-dir, a writable one, readable data), and a result folder to merge."""
    out = tmp_path_factory.mktemp("finished")
    assert evaluate(tiny_ckpt, data_dir, out, "--name", "my-run") == 0
    return out / "my-run"


@pytest.mark.parametrize("name", ["..", ".", "", "a/b"])
def test_result_names_are_single_path_components(
    name: str, finished: Path, tiny_ckpt: Path, data_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """``..`` would write beside OUT_DIR, ``a/b`` below a folder no later --merge finds; empty and
    ``.`` are OUT_DIR itself. Refused before the data is read, for an evaluation and a merge: status 2,
    one line naming --name, nothing written. Control: ``my-run`` (the fixture) evaluates and merges."""
    monkeypatch.setattr(session, "test_split", no_attacks)
    assert evaluate(tiny_ckpt, data_dir, tmp_path / "out", "--name", name) == 2
    assert "argument --name" in one_error_line(capsys)
    merge = ["--merge", str(finished), "--out-dir", str(tmp_path / "out"), "--name", name]
    assert call_main(evaluate_cli.main, merge) == 2
    assert "argument --name" in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []
    assert (finished / "results.json").exists() and finished.name == "my-run"
    assert call_main(evaluate_cli.main, [*merge[:-1], "my-merge"]) == 0
    assert (tmp_path / "out" / "my-merge" / "correctness.npz").exists()


def merge_inputs(finished: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """Paths --merge must refuse, each with the cause its line must name."""
    npy = root / "npy" / "correctness.npy"  # a NumPy file, in a folder without results
    npy.parent.mkdir()
    np.save(npy, np.ones(3, dtype=bool))
    stray = finished.parent / "stray.npy"  # beside results, but not the folder's correctness.npz
    np.save(stray, np.ones(3, dtype=bool))
    truncated = root / "truncated"
    truncated.mkdir()
    (truncated / "results.json").write_bytes((finished / "results.json").read_bytes())
    whole = (finished / "correctness.npz").read_bytes()
    (truncated / "correctness.npz").write_bytes(whole[: len(whole) // 2])
    empty = root / "empty"
    empty.mkdir()
    damaged = {"garbage json": b"{not json", "garbage npz": os.urandom(256)}
    middle = len(whole) // 2  # the compressed data of the first arrays: their checksums fail
    damaged["corrupt npz"] = whole[:middle] + bytes(b ^ 0xFF for b in whole[middle : middle + 64]) + whole[middle + 64 :]
    for name, content in damaged.items():
        folder = root / name.replace(" ", "-")
        folder.mkdir()
        for file in ("results.json", "correctness.npz"):
            (folder / file).write_bytes((finished / file).read_bytes())
        (folder / ("results.json" if "json" in name else "correctness.npz")).write_bytes(content)
    return {
        "a .npy file": (npy, "not a result folder of evaluate.py; pass the folder or its correctness.npz"),
        "a .npy beside results": (stray, "not a result folder"),
        "a truncated .npz": (truncated, "File is not a zip file"),
        "a folder without results": (empty, "No such file or directory"),
        "garbage json": (root / "garbage-json", "Expecting property name"),
        "garbage npz": (root / "garbage-npz", "not a result folder"),
        "a corrupt .npz": (root / "corrupt-npz", "not a result folder"),
        "a missing path": (root / "nowhere", "no such file or folder"),
    }


def test_merge_of_what_is_not_a_result_is_one_line_naming_it(
    finished: Path, tmp_path: Path, capsys
) -> None:
    """Each input: status 2 (the command is wrong), one line naming the path and the cause, nothing
    written. Control: the finished folder, and its correctness.npz, merge."""
    out = tmp_path / "out"
    for case, (path, cause) in merge_inputs(finished, tmp_path).items():
        assert call_main(evaluate_cli.main, ["--merge", str(path), "--out-dir", str(out)]) == 2, case
        line = one_error_line(capsys)
        assert line.startswith(f"evaluate.py: error: argument --merge: {path}") and cause in line, (case, line)
        assert not out.exists(), case
    for good in (finished, finished / "correctness.npz"):
        assert call_main(evaluate_cli.main, ["--merge", str(good), "--out-dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["merged", "merged-v1"]


def test_out_dir_naming_a_file_is_one_line(
    finished: Path, tiny_ckpt: Path, data_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """For an evaluation (before the data is read) and a merge: status 2, one line naming
    --out-dir and the file, which is left as it was. Control: the fixture's --out-dir, a folder."""
    file = tmp_path / "results"
    file.write_text("notes")
    monkeypatch.setattr(session, "test_split", no_attacks)
    for argv in (
        ["--ckpt", str(tiny_ckpt), "--data-dir", str(data_dir), "--out-dir", str(file), *FAST],
        ["--merge", str(finished), "--out-dir", str(file)],
    ):
        assert call_main(evaluate_cli.main, argv) == 2
        line = one_error_line(capsys)
        assert f"argument --out-dir: {file} is a file" in line, line
    assert file.read_text() == "notes" and (finished / "results.json").exists()


def read_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run as root, where a ``chmod``-ed folder still accepts writes: make check_writable's probe
    file fail as a read-only file system does (other files open as usual)."""

    def probe_refused(file, *args, **kwargs):
        if ".write-test-" in os.fspath(file):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(file))
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(checkpoint_files, "open", probe_refused, raising=False)


def test_a_read_only_output_folder_is_refused_before_any_attack(
    tiny_ckpt: Path, data_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """One line naming the results folder and the cause, status 2, and no attack ran (their work
    would be lost); a merge is refused the same way. Control: the same command on a writable folder
    evaluates (and the same patch of the attacks would have caught them running)."""
    out = tmp_path / "out"
    read_only(monkeypatch)
    monkeypatch.setattr(session, "run_evaluation", no_attacks)
    assert evaluate(tiny_ckpt, data_dir, out, "--name", "r") == 2
    line = one_error_line(capsys)
    assert f"cannot write the results folder {out / 'r'}: Read-only file system" in line, line
    assert not out.exists()
    monkeypatch.undo()
    assert evaluate(tiny_ckpt, data_dir, out, "--name", "r") == 0
    assert (out / "r" / "results.json").exists()
    read_only(monkeypatch)
    assert call_main(evaluate_cli.main, ["--merge", str(out / "r"), "--out-dir", str(out)]) == 2
    assert "cannot write the results folder" in one_error_line(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["r"]


def test_an_unreadable_data_file_is_the_users_to_fix(
    tiny_ckpt: Path, data_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """Tests run as root, where ``chmod 000`` denies nothing: reading the test images raises
    PermissionError as it would for another user. One line naming the file and the cause, status 1,
    no traceback, nothing written. Control: a content fault in the same place is a corrupt file."""
    read_bytes = Path.read_bytes
    fault: list[BaseException] = [PermissionError(errno.EACCES, "Permission denied")]

    def denied(self: Path) -> bytes:
        if self.name == "t10k-images-idx3-ubyte":
            exc = fault[0]
            raise type(exc)(exc.errno, exc.strerror, str(self)) if isinstance(exc, OSError) else exc
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    monkeypatch.setattr(session, "run_evaluation", no_attacks)
    assert evaluate(tiny_ckpt, data_dir, tmp_path / "out") == 1
    line = one_error_line(capsys)
    assert "t10k-images-idx3-ubyte: Permission denied; check its permissions" in line, line
    assert "corrupt" not in line and not (tmp_path / "out").exists()
    fault[0] = IndexError("garbage")
    assert evaluate(tiny_ckpt, data_dir, tmp_path / "out") == 1
    assert "truncated or corrupt" in one_error_line(capsys)
