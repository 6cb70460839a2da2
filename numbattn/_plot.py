"""Draw a run of ``python -m numbattn bench``: numbattn against NumPy and torch across N.

Private: the command line is the interface (``bench --plot FILE.png``, or
``python -m numbattn plot RESULTS.json --out FILE.png`` for a saved
``bench --json`` run); the documentation build calls :func:`draw` too.

One panel per dtype; in each, the median time per call of numbattn, the
NumPy baseline and torch against the sequence length N (both axes
logarithmic), one line per implementation and case (kernel, causal, B, H,
d). numbattn's time is the one with a new output each call (``new_out_s``),
as the baselines allocate theirs. The title names the machine as the run
recorded it.

matplotlib is imported only when drawing: ``import numbattn`` never
imports it. It comes with the ``plot`` extra (``pip install
"numbattn[plot]"``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: (label, JSON key of the time in seconds, colour) of each implementation.
IMPLEMENTATIONS = (
    ("numbattn", "new_out_s", "#2a6fb0"),
    ("NumPy", "numpy_s", "#d08a1c"),
    ("torch", "torch_s", "#b0392a"),
)
_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"))


class PlotError(Exception):
    """A run that cannot be drawn, or matplotlib missing."""


def load(path: str | Path) -> dict:
    """Read a ``bench --json`` file; PlotError unless it holds timed rows."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise PlotError(f"cannot read {path}: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), list):
        raise PlotError(
            f"{path} is not the JSON of `python -m numbattn bench --json` "
            "(no 'results' list; decode and --dask runs are not drawn)"
        )
    return doc


def machine_label(doc: dict) -> str:
    """The machine as the run recorded it, e.g. 'AMD EPYC (family 25, model 17), 2 CPUs'."""
    m = doc.get("machine") or {}
    if doc.get("device") == "cuda" and m.get("gpu"):
        name = str(m["gpu"])
    else:
        name = str(m.get("cpu") or doc.get("device") or "unknown machine")
        if m.get("cpu_family") is not None:
            name += f" (family {m['cpu_family']}, model {m.get('cpu_model')})"
        if m.get("cpu_count"):
            name += f", {m['cpu_count']} CPUs"
    threads = doc.get("threads")
    return name + (f", {threads} threads" if threads else "")


def series(doc: dict) -> dict[str, dict[str, dict[str, list[tuple[int, float]]]]]:
    """dtype -> case -> implementation -> [(N, seconds), ...] sorted by N.

    A case is a kernel with its causal flag and the shape less N; rows
    without a timing for an implementation (torch not installed, or no
    NumPy baseline for ``backward``) leave it out.
    """
    out: dict[str, dict[str, dict[str, list[tuple[int, float]]]]] = {}
    for row in doc["results"]:
        b, h, n, d = row["shape"]
        if row["kernel"] == "softmax":
            case = f"softmax {b}x{h}xNxN"
        else:
            case = f"{row['kernel']}{' causal' if row['causal'] else ''} {b}x{h}xNx{d}"
        per_case = out.setdefault(row["dtype"], {}).setdefault(case, {})
        for label, key, _ in IMPLEMENTATIONS:
            seconds = row.get(key)
            if seconds:
                per_case.setdefault(label, []).append((int(n), float(seconds)))
    for cases in out.values():
        for impls in cases.values():
            for points in impls.values():
                points.sort()
    return out


def figure_class() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise PlotError(
            'drawing needs matplotlib: pip install "numbattn[plot]" (the plot extra)'
        ) from exc
    return Figure


def draw(run: dict | str | Path, path: str | Path | None = None) -> Any:
    """Draw a bench run, one panel per dtype, and save it to ``path`` if given.

    Parameters
    ----------
    run : dict or path
        The document ``python -m numbattn bench --json`` prints, or the path
        of a file holding it.
    path : str or Path, optional
        Where to save the picture (PNG, or any format matplotlib writes,
        chosen by the suffix); parent folders are created.

    Returns
    -------
    matplotlib.figure.Figure
        The figure: one axes per dtype, titled with the dtype.

    Raises
    ------
    PlotError
        If matplotlib is not installed, the file cannot be read, or the run
        has no timed rows.
    """
    doc = load(run) if isinstance(run, str | Path) else run
    data = series(doc)
    if not data:
        raise PlotError("the run has no results to draw")
    Figure = figure_class()
    from matplotlib import ticker

    dtypes = sorted(data)
    fig = Figure(figsize=(5.2 * len(dtypes), 4.4), layout="constrained")
    axes = fig.subplots(1, len(dtypes), squeeze=False)[0]
    for ax, dtype in zip(axes, dtypes):
        cases = data[dtype]
        ns: set[int] = set()
        for (case, impls), (line, marker) in zip(cases.items(), _STYLES * len(cases)):
            for label, _, colour in IMPLEMENTATIONS:
                points = impls.get(label)
                if not points:
                    continue
                xs = [n for n, _ in points]
                ns.update(xs)
                ax.plot(
                    xs,
                    [s * 1e3 for _, s in points],
                    line,
                    marker=marker,
                    color=colour,
                    label=label if len(cases) == 1 else f"{label}, {case}",
                )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sorted(ns), [str(n) for n in sorted(ns)])
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False))
        ax.set_xlabel("sequence length N")
        ax.set_ylabel("median time per call (ms)")
        only = next(iter(cases)) if len(cases) == 1 else ""
        ax.set_title(f"{dtype}  {only}".strip(), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    versions = doc.get("numbattn") or {}
    soft = ", ".join(
        f"{name} {versions[key]}"
        for name, key in (("numbattn", "version"), ("numba", "numba"), ("NumPy", "numpy"))
        if versions.get(key)
    )
    if versions.get("torch"):
        soft += f", torch {versions['torch']}"
    when = f", {doc['date'][:10]}" if doc.get("date") else ""
    fig.suptitle(f"{machine_label(doc)}{when}\n{soft}; lower is faster", fontsize=10)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100, metadata={"Software": None})
    return fig
