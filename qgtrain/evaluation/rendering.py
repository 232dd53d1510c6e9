"""An evaluation record as text: the terminal summary and ``results.md`` (tables in the layout of
the paper's Table 2 and of AutoAttack's per-attack breakdown), for one evaluation or a merge.

Everything here reads the JSON-ready record, so ``results.json``, ``results.md`` and the terminal
always agree. The figures are drawn by ``plots.py``.
"""

from __future__ import annotations

from typing import Any


def pct(value: float | None) -> str:
    """A fraction as a percentage cell, two decimals; empty when not known."""
    return "" if value is None else f"{100 * value:.2f}"


def protocol_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the Table 2 layout: runs, Worst, Avg, seconds; clean first, worst case last."""
    runs = max((len(r["run_accuracies"]) for r in results["rows"]), default=0)
    header = [
        "Attack",
        *[f"Run {i + 1}" for i in range(runs)],
        "Worst",
        "Avg",
        "Gradients",
        "Naive",
        "Time (s)",
    ]
    clean = results["clean"]["accuracy"]
    rows = [["Clean", *["" for _ in range(runs)], pct(clean), pct(clean), "", "", ""]]
    for row in results["rows"]:
        accuracies = [pct(a) for a in row["run_accuracies"]]
        accuracies += [""] * (runs - len(accuracies))
        cost = row.get("cost", {})
        rows.append(
            [
                row["label"],
                *accuracies,
                pct(row["worst"]),
                pct(row["avg"]),
                count(cost.get("gradients")),
                count(cost.get("naive_gradients")),
                f"{row['seconds']:.1f}",
            ]
        )
    rows.append(
        [
            "Worst case (per example, all attacks and runs)",
            *[""] * runs,
            pct(results["ensemble"]["accuracy"]),
            "",
            "",
            "",
            "",
        ]
    )
    return header, rows


def count(value: int | None) -> str:
    """A gradient or query count, short (``1.23M``); ``n/a`` when not known."""
    if value is None:
        return "n/a"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return str(value)


def suite_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The standard suite, AutoAttack style: robust accuracy left after each attack, how many it
    fooled first, and the gradients (and forward queries) it spent against the naive count."""
    header = ["Attack", "Fooled", "Robust after (%)", "Gradients", "Naive", "Queries", "Time (s)"]
    clean = results["clean"]
    rows = [["Clean", str(results["n"] - clean["correct"]), pct(clean["accuracy"]), "", "", "", ""]]
    for attack in results["suite"]["attacks"]:
        cost = attack["cost"]
        rows.append(
            [
                attack["label"],
                str(attack["fooled"]),
                pct(attack["robust_after"]),
                count(cost["gradients"]),
                count(cost["naive_gradients"]),
                count(cost["forwards"]),
                f"{cost['seconds']:.1f}",
            ]
        )
    cost = results["suite"]["cost"]
    rows.append(
        [
            "Suite (per-example worst case)",
            "",
            pct(results["suite"]["accuracy"]),
            count(cost["gradients"]),
            count(cost["naive_gradients"]),
            count(cost["forwards"]),
            f"{cost['seconds']:.1f}",
        ]
    )
    return header, rows


def sweep_table(sweep: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Rows = swept values; one column per line: ``Avg (Worst)``; then the per-example worst case."""
    lines = list(sweep["series"])
    header = [sweep["parameter"], *lines, "worst case"]
    rows = []
    for i, value in enumerate(sweep["values"]):
        cells = [
            f"{pct(sweep['series'][k]['avg'][i])} ({pct(sweep['series'][k]['worst'][i])})" for k in lines
        ]
        rows.append(
            [f"{value:g}" if isinstance(value, float) else str(value), *cells, pct(sweep["ensemble"][i])]
        )
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)])


def describe_setup(record: dict[str, Any]) -> list[str]:
    """Setup lines for results.md and the terminal (tolerates records without checkpoint/data)."""
    s = record["results"]["settings"]
    lines = []
    ckpt, data, env = record.get("checkpoint"), record.get("data"), record["environment"]
    if ckpt:
        lines.append(
            f"Checkpoint: `{ckpt['path']}` ({ckpt['format']}, model {ckpt['model']} {ckpt['model_kwargs']}, "
            f"epoch {ckpt['epoch']}, sha256 {ckpt['sha256'][:12]})"
        )
    if data:
        start, stop = data.get("range") or (0, data["n"])
        which = f"first {data['n']}" if start == 0 else f"examples {start}:{stop} ({data['n']})"
        lines.append(
            f"Data: {data['dataset']} test split, {which} of {data['split_size']} examples, "
            f"batch size {data['batch_size']}"
        )
    else:
        lines.append(f"Data: {record['results']['n']} examples, batch size {record['batch_size']}")
    results = record["results"]
    if results.get("protocol") == "standard":
        quantized = "" if s["b"] == 1 else f", APGD quantized b = {s['b']}"
        rows = (
            f"then the paper rows {', '.join(s['paper_rows'])} ({s['paper_steps']} steps, alpha = "
            f"{s['paper_alpha']:g}, b = {s['paper_b']})"
            if s["paper_rows"]
            else "no paper rows"
        )
        lines.append(
            f"Protocol standard: L-inf, eps = {s['eps']:g}; suite {' -> '.join(s['suite_attacks'])} "
            f"({s['steps']} steps, {s['targets']} targets, {s['queries']} queries{quantized}), each on the "
            f"examples still robust (early exit); {rows}; seed {s['seed']}"
        )
    else:
        lines.append(
            f"Protocol paper: L-inf, eps = {s['eps']:g}, alpha = {s['alpha']:g}, {s['steps']} steps, loss "
            f"{s['loss']}; {s['restarts']} restart(s) merged per example; {s['runs']} independent run(s) "
            f"(run r uses seed {s['seed']} + r); early exit inside each run"
        )
    cost = results.get("cost")
    if cost:
        lines.append(
            f"Gradients spent: {count(cost['gradients'])} of a naive {count(cost['naive_gradients'])} "
            f"(example x step); forward queries {count(cost['forwards'])}"
        )
    if results.get("partial"):
        lines.append(f"PARTIAL: {partial_summary(results)}")
    timing = results.get("time") or {}
    if timing.get("estimated_seconds") is not None:
        lines.append(
            f"Time of the attacks: estimated {timing['estimated_seconds']:.0f} s from the first batch, "
            f"took {timing['seconds']:.0f} s"
        )
    lines += [
        f"Device: {env['device']} ({env['device_name']}), torch {env['packages']['torch']}, "
        f"{env['torch_threads']} threads; wall time {record['wall_seconds']:.1f} s",
    ]
    return lines


def partial_summary(results: dict[str, Any]) -> str:
    """What an interrupted evaluation finished, in one line (per part: the suite's batches, the
    paper rows)."""
    unfinished = results.get("unfinished") or []
    left_out = f"; not finished, left out: {', '.join(unfinished)}" if unfinished else ""
    if nothing_finished(results):
        return "interrupted before any attack finished a batch; nothing was finished"
    if results.get("protocol") == "standard":
        batches = results["batches"]
        done = (
            f"the suite finished {batches['finished']} of {batches['planned']} batches "
            f"({results['n']} of {results['n_planned']} examples)"
        )
        rows = [row["label"] for row in results["rows"]]
        done += f", and on them {', '.join(rows)}" if rows else ""
        if batches["finished"] == batches["planned"] and not unfinished:
            done = "every attack finished; the gradient-masking checks did not"
        return f"interrupted; {done}{left_out}"
    rows = [row["label"] for row in results["rows"]]
    if not unfinished:
        return "interrupted; every attack finished; the sweeps or gradient-masking checks did not"
    return f"interrupted; finished (every run, all {results['n']} examples): {', '.join(rows)}{left_out}"


def nothing_finished(results: dict[str, Any]) -> bool:
    """An interrupted evaluation that finished no attack on any batch (nothing worth writing)."""
    return bool(results.get("partial")) and (
        results["n"] == 0 or not (results.get("suite") or results["rows"])
    )


def shows_rows(results: dict[str, Any]) -> bool:
    """The per-run table is shown for the paper protocol, and for standard when it has paper rows
    (with ``--attacks none`` it would repeat Clean and the suite's worst case)."""
    return results.get("protocol") != "standard" or bool(results["rows"])


def render_markdown(record: dict[str, Any]) -> str:
    """results.md: the setup, masking warnings, the Table 2-style table, sweep tables and figures."""
    out = [f"# Robustness evaluation: {record['name']}", ""]
    out += [f"- {line}" for line in describe_setup(record)]
    out += ["", "## Gradient-masking checks", ""]
    masking = record["masking"]
    if masking.get("skipped") == "interrupted":
        out.append("Not run: the evaluation was interrupted.")
    elif not masking["enabled"]:
        out.append("Checks disabled (--no-masking-checks).")
    elif masking["warnings"]:
        out += [f"- **Warning:** {w}" for w in masking["warnings"]]
    else:
        names = sorted({c["name"] for c in masking["checks"]})
        out.append(f"No check fired ({', '.join(names)}).")
    if record["results"].get("suite"):
        out += ["", "## Standard suite: robust accuracy after each attack", ""]
        out.append(markdown_table(*suite_table(record["results"])))
        if "suite.png" in record.get("figures", []):
            out += ["", "![robust accuracy after each attack, and the gradients spent](suite.png)"]
    if shows_rows(record["results"]):
        out += ["", "## Accuracy (%) per run, Worst and Avg over runs", ""]
        out.append(markdown_table(*protocol_table(record["results"])))
    if "accuracy.png" in record.get("figures", []):
        out += ["", "![robust accuracy per attack](accuracy.png)"]
    for sweep in record["sweeps"]:
        out += ["", f"## Sweep over {sweep['parameter']}: Avg (Worst) accuracy (%)", ""]
        out.append(markdown_table(*sweep_table(sweep)))
        figure = f"sweep_{sweep['parameter']}.png"
        if figure in record.get("figures", []):
            out += ["", f"![accuracy vs {sweep['parameter']}]({figure})"]
    if record.get("histogram"):
        stats = record["histogram"]
        out += ["", "## Gradient histograms (Figure 2)", ""]
        out.append(
            f"{stats['examples']} examples, {stats['components']} components; exactly zero: "
            f"{pct(stats['zero_fraction'])}%."
        )
        out.append("")
        header = ["b", "components at ±1 (%)", "zero (%)", "distinct values"]
        rows = [
            [b, pct(q["sign_like_fraction"]), pct(q["zero_fraction"]), str(q["distinct_values"])]
            for b, q in stats["quantized"].items()
        ]
        out.append(markdown_table(header, rows))
        if "histogram.png" in record.get("figures", []):
            out += ["", "![gradient histograms](histogram.png)"]
    return "\n".join(out) + "\n"


def render_summary(record: dict[str, Any]) -> str:
    """The terminal summary: setup lines, the main table, sweep tables, warnings."""
    out = describe_setup(record)
    if record["results"].get("suite"):
        out += ["", text_table(*suite_table(record["results"]))]
    if shows_rows(record["results"]):
        out += ["", text_table(*protocol_table(record["results"]))]
    for sweep in record["sweeps"]:
        out += ["", f"sweep over {sweep['parameter']} (Avg (Worst) %):", text_table(*sweep_table(sweep))]
    out += [f"WARNING: {w}" for w in record["masking"]["warnings"]]
    return "\n".join(out)


def merged_report(record: dict[str, Any], markdown: bool) -> str:
    """The merged record as ``results.md`` (``markdown``) or the terminal summary."""
    table = markdown_table if markdown else text_table
    heading = (lambda t: ["", f"## {t}", ""]) if markdown else (lambda t: ["", t])
    ckpt = record.get("checkpoint") or {}
    lines = [
        f"Checkpoint: `{ckpt.get('path')}` (sha256 {str(ckpt.get('sha256'))[:12]})",
        f"Examples: {record['n']} of the {record['dataset']} test split ({record['examples']}), "
        f"from {record['parts']} result folders",
        f"Per-example worst case over {len(record['evaluations'])} evaluation(s): clean {pct(record['clean']['accuracy'])} %, "
        f"robust {pct(record['robust']['accuracy'])} %",
    ]
    out = [f"# Merged evaluation: {record['name']}", ""] if markdown else []
    out += [f"- {line}" for line in lines] if markdown else lines
    for j, evaluation in enumerate(record["evaluations"], 1):
        s = evaluation["settings"]
        what = (
            f"suite {' -> '.join(s['suite_attacks'])}, rows {', '.join(s['paper_rows']) or 'none'}"
            if evaluation["protocol"] == "standard"
            else f"attacks {', '.join(s['attacks'])}, {s['runs']} run(s), {s['restarts']} restart(s)"
        )
        out += heading(
            f"Evaluation {j}: {evaluation['protocol']}, eps {s['eps']:g}, {what}, seed {s['seed']}; "
            f"{evaluation['n']} examples ({evaluation['examples']}): clean {pct(evaluation['clean']['accuracy'])} %, "
            f"robust {pct(evaluation['robust']['accuracy'])} %"
        )
        if evaluation.get("suite"):
            rows = [
                [a["label"], str(a["fooled"]), pct(a["accuracy"])] for a in evaluation["suite"]["attacks"]
            ]
            out.append(table(["Attack", "Fooled", "Robust after (%)"], rows))
        if evaluation["rows"]:
            runs = max(len(r["run_accuracies"]) for r in evaluation["rows"])
            rows = [
                [r["label"], *[pct(a) for a in r["run_accuracies"]], *[""] * (runs - len(r["run_accuracies"])),
                 pct(r["worst"]), pct(r["avg"])]
                for r in evaluation["rows"]
            ]  # fmt: skip
            out += ["", table(["Row", *[f"Run {i + 1}" for i in range(runs)], "Worst", "Avg"], rows)]
        header = [
            "Part",
            "Examples",
            "Clean (%)",
            "Robust (%)",
            "Gradients",
            "Naive",
            "Attacks (s)",
            "Wall (s)",
            "Device",
        ]
        rows = [
            [p["folder"], p["examples"], pct(p["clean"]), pct(p["robust"]), count(p["cost"].get("gradients")),
             count(p["cost"].get("naive_gradients")), seconds_cell(p["attack_seconds"]), seconds_cell(p["wall_seconds"]),
             str(p["device"] or "")]
            for p in evaluation["parts"]
        ]  # fmt: skip
        total = evaluation["cost"]
        rows.append(
            ["Total", evaluation["examples"], pct(evaluation["clean"]["accuracy"]), pct(evaluation["robust"]["accuracy"]),
             count(total["gradients"]), count(total["naive_gradients"]), "", seconds_cell(total["wall_seconds"]), ""]
        )  # fmt: skip
        out += ["", table(header, rows)]
    return "\n".join(out) + "\n"


def seconds_cell(value: float | None) -> str:
    """Whole seconds for a table cell; empty when not known."""
    return "" if value is None else f"{value:.0f}"
