"""Every ``python train.py …`` and ``python evaluate.py …`` line that README.md and docs/*.md show
parses and instantiates exactly as written (read from the files, so the docs cannot drift from the
code); training and evaluation themselves are replaced by a recorder of what would run. Every
``python -m benchmarks.<script> …`` there and in benchmarks/README.md (code blocks and inline code)
names a benchmark and parses with its own parser, nothing run. The Quickstart's offline note and the
CPU-only install recipe's reachability check are read the same way."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
import yaml

from qgtrain.cli import evaluate as evaluate_cli
from qgtrain.cli import train as train_cli
from qgtrain.evaluation import session
from qgtrain.models import build_model
from tests.helpers import call_main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPT = re.compile(r"(?:^|\s)(train|evaluate)\.py(?=\s|$)")


def commands_in(words: list[str]) -> list[tuple[str, list[str], str | None]]:
    """``(script, argv, stdout file)`` of each ``python train.py …``/``python evaluate.py …`` (also
    behind ``srun``, and ``torchrun … train.py``) in one shell line's words, split at ``&&``."""
    found, start = [], 0
    for end in [i for i, word in enumerate(words) if word == "&&"] + [len(words)]:
        command, start = words[start:end], end + 1
        for i, word in enumerate(command):
            before = command[i - 1] if i else ""
            if word in ("train.py", "evaluate.py") and (
                before in ("python", "python3") or command[0] == "torchrun"
            ):
                argv, stdout = command[i + 1 :], None
                if ">" in argv:
                    argv, stdout = argv[: argv.index(">")], argv[argv.index(">") + 1]
                found.append((word[: -len(".py")], argv, stdout))
                break
    return found


def documented_commands() -> list[tuple[str, str, list[str], str | None]]:
    """``(where, script, argv, stdout file)`` for every command in the docs' code blocks (line
    continuations joined, ``#`` comments dropped)."""
    found = []
    for doc in DOCS:
        in_code, pending = False, ""
        for number, raw in enumerate(doc.read_text().splitlines(), 1):
            if raw.lstrip().startswith("```"):
                in_code, pending = not in_code, ""
                continue
            line = pending + raw
            if not in_code or line.rstrip().endswith("\\"):
                pending = line.rstrip()[:-1] + " " if in_code else ""
                continue
            pending = ""
            if SCRIPT.search(line) is not None:
                found += [
                    (f"{doc.name}:{number}", *command)
                    for command in commands_in(shlex.split(line, comments=True))
                ]
    return found


COMMANDS = documented_commands()
MAIN_JOB = ["--inner", "pqgd", "--steps", "10"]
GPU_ONLY = re.compile(r"^(--devices [2-9]|--num-nodes|--precision 16-mixed)")


def test_the_docs_show_the_main_job_and_both_scripts() -> None:
    """A control: the reader finds the commands (an empty list would make every test below pass)."""
    scripts = {script for _, script, _, _ in COMMANDS}
    assert scripts == {"train", "evaluate"} and len(COMMANDS) > 20
    assert ("README.md", "train", tuple(MAIN_JOB)) in {
        (w.split(":")[0], s, tuple(a)) for w, s, a, _ in COMMANDS
    }


class Recorded(BaseException):
    """Raised by the recorders instead of training or evaluating (not an ``Exception``, so that
    ``main`` does not take it for a bug)."""


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, data_root: Path) -> dict[str, Any]:
    """Training and evaluation replaced by recorders; data and checkpoints that the docs name but
    this machine lacks (CIFAR-10, ``best.ckpt``) stand in as tiny tensors and a fresh network."""
    seen: dict[str, Any] = {}
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")  # `--config configs/...` as from the repository root
    monkeypatch.setenv("QGTRAIN_DATA", str(data_root))

    def fit(trainer: L.Trainer, model: L.LightningModule, **kwargs: Any) -> None:
        seen["trainer"], seen["module"] = trainer, model
        raise Recorded

    def check_before_fit(cli: train_cli.QGTrainCLI) -> None:
        seen["cli"] = cli
        if cli.config.data.class_path.endswith("MNISTDataModule"):
            cli.datamodule.prepare_data()  # the real data where this machine has it

    def load(path: Path, model: str | None, dataset: str | None, kwargs: dict, weights: str) -> tuple[Any, Any]:
        info = SimpleNamespace(dataset=dataset or "mnist", model=model or "madry_mnist")
        info.to_dict = lambda: vars(info).copy()
        return build_model(model or "madry_mnist", **kwargs).eval(), info

    def evaluate(request: Any, net: Any, batches: Any, settings: Any, device: Any, about: Any, prog: str) -> int:
        seen["settings"], seen["request"] = settings, request
        raise Recorded

    monkeypatch.setattr(L.Trainer, "fit", fit)
    monkeypatch.setattr(train_cli.QGTrainCLI, "check_before_fit", check_before_fit)
    monkeypatch.setattr(session, "load_model_from_checkpoint", load)
    monkeypatch.setattr(
        session, "test_split", lambda *a: (torch.rand(10_000, 1, 28, 28), torch.arange(10_000) % 10)
    )
    monkeypatch.setattr(session, "attack_and_write", evaluate)
    monkeypatch.setattr(session, "write_merged", lambda paths, out: seen.setdefault("merged", paths))
    return seen


@pytest.mark.parametrize(("where", "script", "argv", "stdout"), COMMANDS, ids=[c[0] for c in COMMANDS])
def test_documented_command_runs_as_written(
    where: str,
    script: str,
    argv: list[str],
    stdout: str | None,
    recorder: dict[str, Any],
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if script == "train" and any(GPU_ONLY.match(" ".join(argv[i : i + 2])) for i in range(len(argv))):
        monkeypatch.setattr(train_cli.QGTrainCLI, "instantiate_trainer", _record_trainer(recorder))
    if "--config" in argv and not Path(argv[argv.index("--config") + 1]).exists():
        pytest.skip(f"{where}: reads a config an earlier command writes")  # run by the chained test
    main = train_cli.main if script == "train" else evaluate_cli.main
    try:
        status = call_main(main, argv)
    except Recorded:
        status = 0
    out, err = capsys.readouterr()
    assert status == 0 and "error:" not in err, f"{where}: {script}.py {' '.join(argv)}\n{err}"
    if "--print_config" in argv:
        assert yaml.safe_load(out)["model"]["inner"], f"{where}: no config printed"
    else:
        assert recorder, f"{where}: nothing ran"


def _record_trainer(seen: dict[str, Any]) -> Any:
    """For multi-GPU commands on this CPU machine: the trainer's resolved arguments, not a Trainer."""

    def instantiate_trainer(cli: train_cli.QGTrainCLI, **kwargs: Any) -> Any:
        seen["trainer_config"] = cli.config.trainer
        raise Recorded

    return instantiate_trainer


def test_the_readme_main_job_resolves_to_pqgd_10(recorder: dict[str, Any]) -> None:
    """The Quickstart's main job, exactly as written there: PQGD-10, b 100, trained at eps 0.4 with
    alpha eps / k = 0.04 (validated at 0.3), MadryMNIST."""
    quickstart = next(
        argv for where, script, argv, _ in COMMANDS if where.startswith("README") and script == "train"
    )
    assert quickstart == MAIN_JOB
    with pytest.raises(Recorded):
        train_cli.main(quickstart)
    inner, net = recorder["module"].inner, recorder["module"].net
    assert type(inner).__name__ == "PQGD" and (inner.steps, inner.b) == (10, 100)
    assert (inner.eps, recorder["module"].val_attack.eps) == (0.4, 0.3)
    assert inner.alpha == pytest.approx(0.04) and type(net).__name__ == "MadryMNIST"


def test_a_printed_config_trains_the_same_run(
    recorder: dict[str, Any], capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    """The docs' ``--print_config > my.yaml && python train.py --config my.yaml`` chain."""
    chained = [(argv, out) for _, script, argv, out in COMMANDS if script == "train" and out]
    assert chained
    for argv, out in chained:
        assert call_main(train_cli.main, argv) == 0
        Path(out).write_text(capsys.readouterr().out)
    written = {out for _, out in chained}
    follower = next(
        argv
        for _, script, argv, _ in COMMANDS
        if script == "train" and "--config" in argv and argv[argv.index("--config") + 1] in written
    )
    with pytest.raises(Recorded):
        train_cli.main(follower)
    assert type(recorder["module"].inner).__name__ == "PQGD" and recorder["module"].inner.steps == 10


CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def quickstart_note(readme: str) -> str:
    """The first paragraph after the Quickstart's command blocks."""
    quickstart = readme.split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    after_commands = quickstart.rsplit("```\n", 1)[1]
    return after_commands.strip().split("\n\n", 1)[0]


def test_the_offline_note_comes_right_after_the_quickstart_commands() -> None:
    """Offline users meet where to put MNIST before their first failure, not below the install notes."""
    readme = (ROOT / "README.md").read_text()
    note = quickstart_note(readme)
    assert all(
        word in note for word in ("QGTRAIN_DATA", "--data-dir", "MNIST/raw/", "t10k-labels-idx1-ubyte")
    )
    # control: the note one paragraph further down (below the install note, as before) is not found
    second = quickstart_note(readme.replace(note + "\n\n", "", 1))
    moved = readme.replace(f"{note}\n\n{second}", f"{second}\n\n{note}", 1)
    assert moved != readme and "QGTRAIN_DATA" not in quickstart_note(moved)


def cpu_install_check() -> str:
    """The CPU-only recipe's step before its first ``pip``: it must be the index's reachability check."""
    recipe = next(
        line
        for line in (ROOT / "docs" / "TRAINING.md").read_text().splitlines()
        if line.startswith("python3 -m venv") and f"--index-url {CPU_INDEX} " in line
    )
    steps = recipe.split(" && ")
    first_pip = next(i for i, step in enumerate(steps) if step.startswith("pip "))
    assert steps[: first_pip - 1] == ["python3 -m venv .venv", ". .venv/bin/activate"], recipe
    return steps[first_pip - 1]


def run_check(check: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    """``check`` run by bash with this interpreter's ``python`` first on PATH, and its seconds."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    start = time.monotonic()
    done = subprocess.run(
        ["bash", "-c", check], env={**env, "PATH": path}, capture_output=True, text=True, timeout=60
    )
    return done, time.monotonic() - start


def test_the_cpu_install_recipe_stops_at_once_with_one_line_when_the_index_is_unreachable() -> None:
    """Offline, the recipe must not fall through to pip (which retries, then takes a mismatched
    torchvision from other indexes): one ``error:`` line naming the index, non-zero, within seconds."""
    check = cpu_install_check()
    with socket.socket() as probe:  # a loopback port nothing listens on: the proxy refuses at once
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "https_proxy", "all_proxy")}
    done, seconds = run_check(check, {**env, "https_proxy": closed, "HTTPS_PROXY": closed})
    lines = done.stderr.splitlines()
    assert done.returncode != 0 and done.stdout == "" and seconds < 10, (done, seconds)
    assert len(lines) == 1 and lines[0].startswith("error:") and CPU_INDEX in lines[0], done.stderr

    # control: the same check against an index that answers passes silently
    class Index(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        local = check.replace(f"{CPU_INDEX}/torch/", f"http://127.0.0.1:{server.server_port}/whl/cpu/torch/")
        assert local != check
        done, _ = run_check(local, {**env, "no_proxy": "127.0.0.1"})
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 0 and done.stdout == done.stderr == "", done


# ---------------------------------------------------------------- the benchmarks' commands
BENCHMARK_DOCS = [*DOCS, ROOT / "benchmarks" / "README.md"]
BENCHMARK = re.compile(r"^benchmarks\.(\w+)$")
SEPARATORS = {"&&", "||", ";", "&", "|"}


def code_block_lines(text: str) -> list[tuple[int, str]]:
    """``(line number, line)`` of each line of the code blocks, line continuations joined."""
    found, in_code, pending = [], False, ""
    for number, raw in enumerate(text.splitlines(), 1):
        if raw.lstrip().startswith("```"):
            in_code, pending = not in_code, ""
        elif in_code and raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
        elif in_code:
            found.append((number, pending + raw))
            pending = ""
    return found


def inline_code(text: str) -> list[tuple[int, str]]:
    """``(line number, span)`` of each inline code span (one that wraps is joined into one line)."""
    return [
        (text[: match.start()].count("\n") + 1, match.group(1).replace("\n", " "))
        for match in re.finditer(r"(?<!`)`([^`]+)`(?!`)", text)
    ]


def benchmark_commands_in(line: str) -> list[tuple[str, list[str]]]:
    """``(script, argv)`` of each ``python -m benchmarks.<script> …`` in one shell line (split at
    ``&&``, ``;``, ``&``, ``|``; ``> file`` dropped); a ``<placeholder>`` becomes the word ``<…>``."""
    if re.search(r"python3? -m benchmarks\.", line) is None:
        return []
    lexer = shlex.shlex(re.sub(r"<[^<>]*>", "'<…>'", line), posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    commands, current = [], []
    for word in [*lexer, ";"]:
        if word in SEPARATORS:
            commands.append(current)
            current = []
        else:
            current.append(word)
    found = []
    for words in commands:
        for i in range(len(words) - 2):
            if words[i] in ("python", "python3") and words[i + 1] == "-m" and BENCHMARK.match(words[i + 2]):
                argv = words[i + 3 :]
                found.append((BENCHMARK.match(words[i + 2]).group(1), argv[: argv.index(">")] if ">" in argv else argv))
    return found


def benchmark_commands() -> list[tuple[str, str, list[str]]]:
    """``(where, script, argv)`` for every benchmark command the docs show."""
    found = []
    for doc in BENCHMARK_DOCS:
        text = doc.read_text()
        for number, line in [*code_block_lines(text), *inline_code(text)]:
            found += [(f"{doc.name}:{number}", *command) for command in benchmark_commands_in(line)]
    return found


BENCHMARK_COMMANDS = benchmark_commands()


def test_the_docs_show_the_benchmarks_as_modules() -> None:
    """A control: the reader finds the benchmark commands, in code blocks and inline, for several scripts."""
    scripts = {script for _, script, _ in BENCHMARK_COMMANDS}
    assert {"cheap_training", "attack_strength", "evaluation_strength", "gpu_check"} <= scripts
    assert len(BENCHMARK_COMMANDS) > 30
    # control of the reader: a wrapped inline command, a chain and a placeholder
    assert benchmark_commands_in("a && python -m benchmarks.steps --x 1 > out; python3 -m benchmarks.gpu_check") == [
        ("steps", ["--x", "1"]),
        ("gpu_check", []),
    ]
    assert benchmark_commands_in("python -m benchmarks.attack_strength --ckpt <best.ckpt> # comment") == [
        ("attack_strength", ["--ckpt", "<…>"])
    ]
    assert benchmark_commands_in("python benchmarks/attack_strength.py") == []


class Parsed(BaseException):
    """Raised instead of running a benchmark once its parser accepted the arguments."""


@pytest.mark.parametrize(
    ("where", "script", "argv"), BENCHMARK_COMMANDS, ids=[c[0] for c in BENCHMARK_COMMANDS]
)
def test_documented_benchmark_command_parses_as_written(
    where: str, script: str, argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    if "<…>" in argv:
        pytest.skip(f"{where}: a placeholder stands for a value")
    module = importlib.import_module(f"benchmarks.{script}")
    parse_args = argparse.ArgumentParser.parse_args

    def parse_only(parser: argparse.ArgumentParser, args: Any = None, namespace: Any = None) -> None:
        raise Parsed(parse_args(parser, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    monkeypatch.setattr(sys, "argv", [module.__file__, *argv])
    try:
        module.main()
    except Parsed:
        pass
    except SystemExit as exc:
        pytest.fail(f"{where}: python -m benchmarks.{script} {shlex.join(argv)}: exit {exc.code}\n{capsys.readouterr().err}")
    else:
        pytest.fail(f"{where}: benchmarks.{script}.main() did not parse its arguments")
    assert capsys.readouterr().err == "", where

