"""The documentation's examples run, and its API reference lists every public name.

Every ``>>>`` example on the pages under docs/ runs as a doctest; every
```` ```python ```` block runs as written (except the few listed in
``NOT_RUN``, with the reason). The HTML build itself (``make docs``, with
warnings as errors) is a CI step: it needs the ``docs`` extra.
"""

import doctest
import importlib.util
import re
from pathlib import Path

import pytest

import numbattn

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)

#: (page, first line of the block) -> why the test does not run it.
NOT_RUN = {
    ("dask.md", "import dask.array as da"): "starts a LocalCluster of (8, 16, 4096, 64) "
    "float32 arrays; the page's small synchronous example runs instead",
}


def _id(path: Path) -> str:
    return str(path.relative_to(DOCS))


@pytest.mark.parametrize("page", [p for p in PAGES if ">>> " in p.read_text()], ids=_id)
def test_doctests(page: Path):
    if "numbattn.dask" in page.read_text() and importlib.util.find_spec("dask") is None:
        pytest.skip("needs dask (the dask extra)")
    result = doctest.testfile(
        str(page),
        module_relative=False,
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
        raise_on_error=False,
        verbose=False,
    )
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {page}"


def _python_blocks():
    for page in PAGES:
        for code in re.findall(r"```python\n(.*?)```", page.read_text(), re.S):
            yield pytest.param(page, code, id=f"{_id(page)}:{code.splitlines()[0]}")


@pytest.mark.parametrize(("page", "code"), list(_python_blocks()))
def test_python_blocks(page: Path, code: str):
    reason = NOT_RUN.get((_id(page), code.splitlines()[0]))
    if reason:
        pytest.skip(reason)
    if "import torch" in code:
        pytest.importorskip("torch")
    namespace: dict = {}
    exec(compile(code, str(page), "exec"), namespace)


def test_not_run_entries_exist():
    blocks = {(_id(p), c.splitlines()[0]) for p, c in (b.values for b in _python_blocks())}
    assert set(NOT_RUN) <= blocks


def test_api_reference_lists_every_public_name():
    api = (DOCS / "api.rst").read_text()
    listed, module = set(), "numbattn"
    for line in api.splitlines():
        if line.startswith(".. currentmodule:: "):
            module = line.split()[-1]
        elif re.fullmatch(r"   \w+", line):
            listed.add(f"{module}.{line.strip()}")
    for name in numbattn.__all__:
        if name.startswith("__") or name in ("config", "reference"):
            continue
        assert f"numbattn.{name}" in listed, name
    assert {"numbattn.torch.attention", "numbattn.dask.attention"} <= listed
    for module in ("reference", "config"):
        assert f".. automodule:: numbattn.{module}" in (DOCS / "api" / f"{module}.rst").read_text()


def test_every_page_is_in_a_toctree():
    index = (DOCS / "index.md").read_text()
    for page in PAGES:
        name = _id(page).removesuffix(".md")
        if name != "index":
            assert re.search(rf"^{re.escape(name)}$", index, re.M), name


def test_no_development_history_outside_the_appendix():
    for page in PAGES:
        if "history" in page.parts:
            continue
        text = page.read_text()
        assert not re.search(r"issue [0-9]|#[0-9]{2}|run [0-9]", text), page
