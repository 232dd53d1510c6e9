"""The evaluate.py command suggested after training: sized to the machine, parsed as evaluate.py
parses it, with the time it takes at most here."""

from __future__ import annotations

import shlex

from qgtrain.cli import evaluate as cli
from qgtrain.evaluation.planning import QUICK_EXAMPLES, describe_suggestions, suggested_evaluations
from qgtrain.models import TinyCNN


def test_a_machine_too_slow_for_the_full_evaluation_gets_the_quick_one_first() -> None:
    """Below the full evaluation's time: the quick command first (APGD-CE -> APGD-T, no rows, 1,000
    images, as evaluate.py parses it) and the full one beside it, the quick one much cheaper.
    Control: a machine fast enough gets the full command alone."""
    net = TinyCNN(width=4).eval()
    (quick, quick_s), (full, full_s) = suggested_evaluations("run/best.ckpt", net, "mnist", fits_seconds=0)
    argv = shlex.split(quick)[2:]
    args = cli.build_parser().parse_args(argv)
    settings = cli.build_settings(args, 10)
    assert args.n == QUICK_EXAMPLES and settings.suite_attacks == ["apgd_ce", "apgd_t"]
    assert settings.paper_rows == []
    assert full == "python evaluate.py --ckpt run/best.ckpt" and 0 < quick_s < full_s / 20
    text = describe_suggestions([(quick, quick_s), (full, full_s)], "cpu")
    assert text.splitlines()[0].startswith(f"  next: {quick}   # at most ") and "(a GPU job)" in text
    fast = suggested_evaluations("run/best.ckpt", net, "mnist", fits_seconds=float("inf"))
    assert [command for command, _ in fast] == [full]
    assert describe_suggestions(fast, "cpu").startswith(f"  next: {full}   # at most ")
