"""A small step runner for benchmarks made of ``train.py`` and ``evaluate.py`` commands: a step is done
when its file exists (a training run's marker, touched by the step's shell after exit 0; an
evaluation's ``results.json`` not marked partial); ready steps run at most ``jobs`` at a time, one
thread each; a step whose command a live process already runs (another runner's, say one restarted on
newer code) is left to it and holds one of the ``jobs`` until it ends, when the plan is made again.
Reading a step's outputs: `judgement` (evaluate.py's results.json), `scalars` (train.py's event files)."""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from benchmarks.common import REPO_ROOT

OWNER = {"train.py": ("--run-name", "--checkpoint_root"), "evaluate.py": ("--name", "--out-dir")}
"""The flags that name a command's output: the same script with the same values is the same step."""


@dataclass(frozen=True)
class Step:
    """One command; done when ``target`` exists (a judgement: a results.json not marked partial)."""

    label: str
    command: list[str]
    log: Path
    target: Path
    needs: tuple[Path, ...] = ()
    marker: bool = False  # the shell touches ``target`` after exit 0 (training runs)
    gradients: int = 0  # example-gradients it spends at most (for the plan line)
    forwards: int = 0

    def done(self) -> bool:
        return self.target.is_file() if self.marker else judgement(self.target) is not None

    def running_elsewhere(self, processes: list[tuple[list[str], Path]]) -> bool:
        """One of ``processes`` (a `live_processes` snapshot) runs this command already (another
        runner's): the same script with the same name (``--run-name`` / ``--name``) in the same
        output root."""
        script, (name_flag, root_flag) = self.command[1], OWNER[self.command[1]]
        mine = dict(zip(self.command, self.command[1:], strict=False))
        for argv, cwd in processes:
            given = dict(zip(argv, argv[1:], strict=False))
            if any(Path(a).name == script for a in argv[:3]) and given.get(name_flag) == mine[name_flag]:
                if (cwd / given.get(root_flag, ".")).resolve() == Path(mine[root_flag]).resolve():
                    return True
        return False


def live_processes() -> list[tuple[list[str], Path]]:
    """Each live process's argv and working directory (Linux ``/proc``; those gone or unreadable skipped)."""
    processes = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            processes.append((argv, Path(os.readlink(proc / "cwd"))))
        except OSError:
            continue
    return processes


def run_steps(plan: Callable[[], list[Step]], jobs: int) -> list[str]:
    """Launch ready steps (inputs there, not done, not running anywhere), judgements before training
    and otherwise in the plan's order, at most ``jobs`` at a time counting those another process
    runs, one thread each, until none is left that can start or is running; return the labels of
    failed steps."""
    running: dict[str, subprocess.Popen] = {}
    elsewhere: dict[str, Step] = {}  # run by another live process: each holds a job until it ends
    failed: list[str] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    shell = '"${@:3}" >> "$1" 2>&1 && if [ -n "$2" ]; then touch "$2"; fi'
    changed = True
    while True:
        for label, process in list(running.items()):
            if process.poll() is not None:
                del running[label]
                changed = True
                failed += [label] if process.returncode else []
                log(f"{label}: {f'FAILED (exit {process.returncode})' if process.returncode else 'done'}")
        processes = live_processes() if elsewhere or changed else []  # one /proc scan per pass
        for label, step in list(elsewhere.items()):
            if not step.running_elsewhere(processes):
                del elsewhere[label]
                changed = True
                log(f"{label}: the other process ended; {'done' if step.done() else 'not done'}")
        if changed:  # plan again only when a step ended: the frontier's steps appear when known
            skip = {*running, *elsewhere, *failed}
            ready = [
                s for s in plan() if s.label not in skip and not s.done() and all(map(Path.exists, s.needs))
            ]
            ready.sort(key=lambda s: s.marker)  # judgements first: a trained run's row before a new run
            for step in [s for s in ready if s.running_elsewhere(processes)]:
                log(f"{step.label}: another process runs it; left to it")
                elsewhere[step.label] = step
                ready.remove(step)
            changed = False
        while ready and len(running) + len(elsewhere) < jobs:
            step = ready.pop(0)
            step.log.parent.mkdir(parents=True, exist_ok=True)
            log(f"{step.label}: {shlex.join(step.command)} >> {step.log}")
            marker = str(step.target) if step.marker else ""
            running[step.label] = subprocess.Popen(
                ["bash", "-c", shell, "step", str(step.log), marker, *step.command], cwd=REPO_ROOT, env=env
            )
        if not running and not elsewhere:
            for step in plan():  # what a finished run should have given and did not (a -vN folder, say)
                if step.label not in failed and not step.done():
                    missing = ", ".join(str(p) for p in step.needs if not p.exists())
                    log(f"{step.label}: not run: {missing or 'its inputs'} absent")
            return failed
        time.sleep(1.0)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def judgement(path: Path) -> dict[str, Any] | None:
    """evaluate.py's record at ``path``; None while it is absent, being written, or marked partial."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return None if record["results"].get("partial") else record


def scalars(folder: Path) -> dict[str, list[float]]:
    """Epoch-level TensorBoard scalars of a run, over its versions (a later version wins at the same
    step), in step order. A resumed run continues its version from a purge marker, which TensorBoard
    applies with an "out of order event" notice per marker: silenced, it is the expected case."""
    logging.getLogger("tensorboard").setLevel(logging.ERROR)
    merged: dict[str, dict[int, float]] = {}
    for version in sorted(folder.glob("version_*"), key=lambda p: int(p.name.split("_")[1])):
        events = EventAccumulator(str(version), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            merged.setdefault(tag, {}).update({e.step: e.value for e in events.Scalars(tag)})
    return {tag: [v for _, v in sorted(values.items())] for tag, values in merged.items()}
