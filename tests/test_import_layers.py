"""Imports flow one way: each package of megasora/ imports only packages on lower floors.

Floors, bottom to top. A package imports its own modules and packages on lower floors; packages
sharing a floor are peers and do not import each other.

    0  errors, megasora         what a user can fix (every package raises these); the version
    1  config, hardware,        the inputs of a run: what was asked, what the machine can do,
       launcher                 which rank this process is (read from the environment only)
    2  kernels                  fused C++/CUDA ops and their PyTorch references
    3  models                   single-device DiT, VAE, text encoder and their FLOP counts
    4  parallel, data           a model split over a mesh | clips, shards and streams of latents
    5  diffusion                flow objective, masks, sampler (uses the VAE and video I/O)
    6  train                    the training step, checkpoints, EMA, accounting
    7  plan                     analytic memory/time model of a layout (of models and parallel)
    8  scale, eval              studies of many training runs | evaluations of trained models
    9  commands                 one module per `megasora` subcommand
    10 cli                      the argument parser over the commands
    11 __main__                 `python -m megasora`

Why this order: the model knows nothing of how it is split, so parallel sits above models;
training uses the model, its parallelization, data and the objective; the planner predicts
training runs (it reads the model's FLOPs and the parallel rules, never the other way round);
studies and evaluations drive the planner and the trainer; a command only wires arguments to
the floors below.

Three checks: no package imports a package on a higher floor or a peer (imports inside
functions included: hiding an import in a function does not change the dependency); no cycle
of module-level imports between files; an import inside a function says why (`# lazy: ...`,
kept only for heavy optional dependencies).
"""
from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "megasora"
FLOORS = [
    {"errors", "megasora"},
    {"config", "hardware", "launcher"},
    {"kernels"},
    {"models"},
    {"parallel", "data"},
    {"diffusion"},
    {"train"},
    {"plan"},
    {"scale", "eval"},
    {"commands"},
    {"cli"},
    {"__main__"},
]
FLOOR = {name: level for level, names in enumerate(FLOORS) for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def package_of(module: str) -> str:
    """megasora.train.loop -> train; megasora.errors -> errors; megasora -> megasora."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imported_modules(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The megasora modules an import statement loads (`from pkg import submodule` counts the submodule)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in MODULES]
    base = node.module or ""
    if node.level:
        here = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
    found = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
    return found or ([base] if base in MODULES else [])


def imports(module: str) -> list[tuple[str, int, bool, str]]:
    """(imported megasora module, line, inside a function, the source lines above it) per import."""
    source = MODULES[module].read_text()
    lines = source.splitlines()
    out = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in imported_modules(module, child) or [""]:
                    out.append((target, child.lineno, in_function, comment_block(lines, child.lineno)))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(source), False)
    return out


def comment_block(lines: list[str], lineno: int) -> str:
    """The import's line and the imports/comments directly above it (one `# lazy:` may cover a group)."""
    start = lineno - 1
    while start > 0 and lines[start - 1].strip().startswith(("#", "import ", "from ")):
        start -= 1
    return "\n".join(lines[start:lineno])


def test_every_package_has_a_floor():
    missing = sorted({package_of(m) for m in MODULES} - set(FLOOR))
    assert not missing, f"place {missing} on a floor in FLOORS (and in docs/architecture.md)"


def test_no_package_imports_upward_or_sideways():
    wrong = []
    for module in MODULES:
        here = package_of(module)
        for target, line, _, _ in imports(module):
            there = package_of(target) if target else here
            if there != here and FLOOR.get(there, -1) >= FLOOR.get(here, -1):
                wrong.append(f"{MODULES[module].relative_to(PACKAGE.parent)}:{line}: {here} (floor "
                             f"{FLOOR.get(here)}) imports {target} ({there}, floor {FLOOR.get(there)})")
    assert not wrong, "imports that go up or sideways:\n" + "\n".join(wrong)


def test_no_module_level_import_cycle():
    graph = graphlib.TopologicalSorter()
    for module in MODULES:
        graph.add(module, *{t for t, _, in_function, _ in imports(module) if t and t != module and not in_function})
    try:
        graph.prepare()
    except graphlib.CycleError as err:
        pytest.fail(f"module-level import cycle: {' -> '.join(err.args[1])}")


def test_function_level_imports_say_why():
    silent = [f"{MODULES[m].relative_to(PACKAGE.parent)}:{line}" for m in MODULES
              for _, line, in_function, above in imports(m) if in_function and "# lazy:" not in above]
    assert not silent, ("imports inside functions without a `# lazy: <reason>` comment (hoist them to the "
                        "top of the module unless the dependency is heavy and optional):\n" + "\n".join(silent))
