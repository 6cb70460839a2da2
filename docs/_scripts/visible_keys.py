"""Draw which keys each query sees, for the masking options of numbattn.

The masks are read off ``numbattn.reference.scores`` (the float64 NumPy
specification the kernels are tested against): a key is drawn visible where
the score is finite. Run by ``docs/conf.py`` at every build, and by hand to
refresh the README's copy::

    python docs/_scripts/visible_keys.py docs/img/visible-keys.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

# (title, Nq, Nk, options) for each panel; lengths are per batch element.
PANELS = [
    ("causal=True\nNq = Nk = 8", 8, 8, {"causal": True}),
    ("causal=True\nNq = 4, Nk = 8 (bottom-right)", 4, 8, {"causal": True}),
    ("causal=True, diagonal=0\nNq = 4, Nk = 8 (top-left)", 4, 8, {"causal": True, "diagonal": 0}),
    ("window=(2, 0)\nNq = Nk = 8", 8, 8, {"window": (2, 0)}),
    ("window=(2, 1)\nNq = Nk = 8", 8, 8, {"window": (2, 1)}),
    (
        "causal=True, key_lengths=[6],\nquery_lengths=[5], Nq = Nk = 8",
        8,
        8,
        {"causal": True, "key_lengths": np.array([6]), "query_lengths": np.array([5])},
    ),
]


def visible_keys(nq: int, nk: int, options: dict) -> np.ndarray:
    """Boolean (nq, nk): True where query i sees key j, from the reference."""
    import numbattn.reference

    q = np.ones((1, 1, nq, 4))
    k = np.ones((1, 1, nk, 4))
    s = numbattn.reference.scores(q, k, **options)
    return np.isfinite(s[0, 0])


def draw(path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap(["#f2f2f2", "#2a6fb0"])
    fig, axes = plt.subplots(2, 3, figsize=(9.6, 6.4), layout="constrained")
    for ax, (title, nq, nk, options) in zip(axes.flat, PANELS):
        vis = visible_keys(nq, nk, options)
        ax.imshow(vis, cmap=cmap, vmin=0, vmax=1, extent=(-0.5, nk - 0.5, nq - 0.5, -0.5))
        ax.set_xticks(range(nk))
        ax.set_yticks(range(nq))
        ax.set_xticks(np.arange(-0.5, nk), minor=True)
        ax.set_yticks(np.arange(-0.5, nq), minor=True)
        ax.grid(which="minor", color="white", linewidth=1.5)
        ax.tick_params(which="both", length=0, labelsize=8)
        ax.set_xlabel("key j", fontsize=9)
        ax.set_ylabel("query i", fontsize=9)
        ax.set_title(title, fontsize=9)
    fig.suptitle("Visible keys (blue) per query, as numbattn.reference computes them", fontsize=11)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


if __name__ == "__main__":
    draw(sys.argv[1] if len(sys.argv) > 1 else "visible-keys.png")
