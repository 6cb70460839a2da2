"""The README is true: its quick start runs, its commands are the ones CI and
the Makefile run, its links and picture exist, and its function table names
every public function."""

import re
import shlex
from pathlib import Path

import pytest

import numbattn

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEXT = README.read_text()

MAIN_JOB = "python -m pip install . && python -m numbattn bench"
TEST_SUITE = 'python -m pip install -e ".[test]" && python run_tests.py'


def section(title: str) -> str:
    start = TEXT.index(f"## {title}\n")
    end = TEXT.find("\n## ", start + 1)
    return TEXT[start : None if end < 0 else end]


def test_quick_start_runs():
    code = re.search(r"## Quick start\n\n```python\n(.*?)```", TEXT, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md:quick-start", "exec"), namespace)
    assert namespace["op"].shape == (1341, 8, 64)
    assert namespace["out"].shape == (2, 8, 1024, 64)


def test_the_two_commands():
    block = re.search(r"## The two commands\n.*?```bash\n(.*?)```", TEXT, re.S).group(1)
    commands = [line for line in block.splitlines() if line and not line.startswith("#")]
    assert commands == [MAIN_JOB, TEST_SUITE]
    # the Makefile runs the same commands (with pip's -q)
    makefile = (ROOT / "Makefile").read_text()
    assert "$(PYTHON) -m pip install -q . && $(PYTHON) -m numbattn bench" in makefile
    assert '$(PYTHON) -m pip install -q -e ".[test]" && $(PYTHON) run_tests.py' in makefile
    # CI runs the README's test command
    assert "python run_tests.py -q" in (ROOT / ".ci" / "run").read_text()
    assert (ROOT / "run_tests.py").is_file()


def test_bench_subcommands_exist():
    """Every `python -m numbattn ...` option the README shows is accepted."""
    from numbattn.__main__ import build_parser

    parser = build_parser()
    for line in re.findall(r"`(python -m numbattn [^`]*)`", TEXT):
        argv = shlex.split(line)[3:]
        parser.parse_args(argv)


def test_extras_exist():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for extra in re.findall(r'pip install "\.\[(\w+)\]"', section("Installation")):
        assert extra in extras, extra
    assert {"cuda", "dask", "torch", "docs"} <= set(extras)


def test_function_table_covers_the_public_api():
    table = section("Public functions")
    for name in numbattn.__all__:
        if name.startswith("__"):
            continue
        assert f"`{name}" in table or f"`numbattn.{name}" in table, name
    for name in ("numbattn.torch.attention", "numbattn.dask.attention"):
        assert name in table


def test_links_and_images_exist():
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", TEXT)
    local = [t for t in targets if not t.startswith(("http://", "https://"))]
    assert local, "the README links to the docs"
    for target in local:
        assert (ROOT / target).exists(), target


def test_short_and_free_of_development_history():
    assert len(TEXT.splitlines()) <= 260
    assert not re.search(r"issue [0-9]|#[0-9]{2}|run [0-9]", TEXT)


def test_performance_names_machine_and_date():
    perf = section("Performance")
    assert "AMD EPYC" in perf and "H200" in perf
    assert re.search(r"20\d\d-\d\d-\d\d", perf)
