"""The package's import graph, read from the source with ``ast``: no import
circle, and the shared layers (validation, array interop, sequence tables,
layouts, the reference) never import a backend."""

from __future__ import annotations

import ast
from pathlib import Path

import numbattn

ROOT = Path(numbattn.__file__).parent
LEAVES = (
    "numbattn._checks",
    "numbattn._interop",
    "numbattn._layout",
    "numbattn._sequences",
    "numbattn.reference",
    "numbattn._backend",
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """numbattn modules imported anywhere in ``path`` (lazy imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # ``from pkg import mod`` imports the submodule (and runs pkg's
            # __init__, which is not a layer edge); ``from mod import name``
            # imports mod.
            subs = [f"{base}.{a.name}" for a in node.names]
            targets = [t for t in subs if t in modules] or [base]
        for target in targets:
            if target in modules:
                found.add(target)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in ROOT.rglob("*.py")}
    modules = set(paths)
    return {name: _imports(path, name, modules) for name, path in paths.items()}


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_graph_reads_known_edges():
    graph = import_graph()
    assert "numbattn._checks" in graph["numbattn.api"]
    assert "numbattn.cuda.backend" in graph["numbattn.api"]  # a lazy import counts


def test_no_import_circle():
    graph = import_graph()
    circles = []
    for name in graph:
        for other in _reach(graph, name):
            if name in _reach(graph, other):
                circles.append(tuple(sorted((name, other))))
    assert not sorted(set(circles)), sorted(set(circles))


def test_shared_layers_import_no_backend():
    graph = import_graph()
    for leaf in LEAVES:
        if leaf not in graph:
            continue
        bad = {m for m in _reach(graph, leaf) if m.startswith(("numbattn.cpu", "numbattn.cuda"))}
        assert not bad, f"{leaf} reaches into {sorted(bad)}"


def test_numba_device_array_interface_keeps_zero_strides():
    """numba-cuda's DeviceNDArray reports strides None (C-contiguous) for a
    broadcast view that is contiguous once its zero-stride axes are ignored;
    numbattn's shadow must use the real strides (a hardware-only bug: the
    simulator's arrays get their interface from numbattn)."""
    from numbattn._interop import device_interface, interface_shadow

    reported = {"shape": (2, 2, 2, 1), "strides": None, "typestr": "<f4", "data": (4096, False)}

    class DeviceNDArray:  # what numba-cuda 0.30 reports for such a view
        __module__ = "numba.cuda.cudadrv.devicearray"
        shape, strides = (2, 2, 2, 1), (8, 4, 0, 0)

        @property
        def __cuda_array_interface__(self):
            return dict(reported, version=3)

    cai = device_interface(DeviceNDArray())
    assert cai["strides"] == (8, 4, 0, 0)
    assert interface_shadow(cai).strides == (8, 4, 0, 0)

    class Foreign:  # other libraries' contiguous arrays keep strides None
        @property
        def __cuda_array_interface__(self):
            return dict(reported, shape=(2, 2), version=3)

    assert device_interface(Foreign())["strides"] is None
