"""Sphinx configuration for numbattn's documentation.

Build (offline; warnings are errors, as in CI)::

    python -m pip install -e ".[docs]"
    sphinx-build -W --keep-going -n -b html docs /tmp/docs-html
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))  # this checkout's numbattn, not an installed one
sys.path.insert(0, str(DOCS / "_scripts"))

import visible_keys  # noqa: E402

import numbattn  # noqa: E402
import numbattn._plot  # noqa: E402

project = "numbattn"
author = "the numbattn developers"
copyright = "the numbattn developers, BSD-3-Clause"
release = version = numbattn.__version__

extensions = [
    "myst_parser",
    "numpydoc",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "gpu-runs", "_scripts"]

# Pictures generated from the code at every build (docs/_generated is not
# in git); the README shows a committed copy made by the same script.
(DOCS / "_generated").mkdir(exist_ok=True)
visible_keys.draw(DOCS / "_generated" / "visible-keys.png")
# Benchmark runs committed under docs/results/ (one `python -m numbattn bench
# --json` file per machine family and date), drawn as `python -m numbattn plot`
# draws them; docs/performance.md shows docs/_generated/results/<name>.png.
for _run in sorted((DOCS / "results").glob("*.json")):
    numbattn._plot.draw(_run, DOCS / "_generated" / "results" / f"{_run.stem}.png")

# MyST: heading anchors for links such as threads.md#compile-cache-...
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

# API pages: autosummary writes one page per public name under api/generated.
autosummary_generate = True
autodoc_typehints = "none"  # the numpydoc Parameters sections say it
autodoc_default_options = {"member-order": "bysource"}
numpydoc_show_class_members = False
numpydoc_xref_param_type = False
# numbattn.torch needs torch, numbattn.dask needs dask: document them even
# where these are not installed (their docstrings do not need them).
autodoc_mock_imports = [
    name for name in ("torch", "dask", "distributed") if importlib.util.find_spec(name) is None
]

# No intersphinx: the documentation builds offline (CI machines reach only
# the package registries), so references to NumPy, Numba, Dask and torch
# objects are plain text, not links. They are the only unresolved ones allowed.
nitpick_ignore_regex = [
    ("py:.*", r"(numpy|np|numba|dask|da|torch|cupy|distributed)(\..*)?"),
    ("py:class", r"(array|array_like|ndarray|optional|int|float|bool|str|tuple|list|callable)"),
]

html_theme = "alabaster"
html_title = f"numbattn {release}"
html_static_path: list[str] = []
html_theme_options = {
    "description": "Batched attention kernels compiled with Numba",
    "page_width": "1180px",
    "sidebar_width": "230px",
}
