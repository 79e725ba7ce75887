"""The package's import layers (CONTRIBUTING.md, "Layers"): every import of every module under
src/dreamerv4, deferred ones inside functions included, goes to its own layer or one below.

    pytest tests/test_layering.py -q

Also: the checker itself flags a forbidden import (so this test can fail), and importing the run
config loads no training, evaluation or command code.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "dreamerv4"

# Bottom to top. A module belongs to the layer of the longest prefix listed for it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("dreamerv4", "dreamerv4.errors", "dreamerv4.config", "dreamerv4.actions", "dreamerv4.checkpoint",
              "dreamerv4.media")),
    ("data", ("dreamerv4.data",)),
    ("models", ("dreamerv4.models",)),
    ("training", ("dreamerv4.training", "dreamerv4.run_config")),
    ("evaluation", ("dreamerv4.evaluation",)),
    ("commands", ("dreamerv4.pipeline", "dreamerv4.info", "dreamerv4.cli", "dreamerv4.play")),
]


def layer_of(module: str) -> int:
    """Index in LAYERS of a dreamerv4 module (KeyError for a module no layer claims)."""
    best, rank = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), index
    if rank is None:
        raise KeyError(f"{module}: in no layer of tests/test_layering.py LAYERS")
    return rank


def imported_modules(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, dreamerv4 module) of every import in `source`, at any depth (functions, if blocks).
    `from dreamerv4.x import y` counts as dreamerv4.x.y when that is a module, else dreamerv4.x."""
    found = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == PACKAGE]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .y import z
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append((node.lineno, candidate if _is_module(candidate) else base))
    return found


def _is_module(name: str) -> bool:
    path = SRC.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """One line per import of `source` (the text of `module`) that goes to a higher layer."""
    own = layer_of(module)
    out = []
    for line, target in imported_modules(source, module, is_package):
        if layer_of(target) > own:
            out.append(f"{module}:{line} imports {target} ({LAYERS[own][0]} may not import {LAYERS[layer_of(target)][0]})")
    return out


def package_modules() -> list[tuple[str, Path]]:
    modules = []
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        modules.append((".".join(parts[:-1] if parts[-1] == "__init__" else parts), path))
    return modules


def test_every_import_follows_the_layers():
    found = []
    for module, path in package_modules():
        found += violations(path.read_text(), module, is_package=path.name == "__init__.py")
    assert not found, "imports against the layer order:\n" + "\n".join(found)


def test_every_module_has_a_layer():
    for module, _ in package_modules():
        layer_of(module)  # raises for a module no layer claims


@pytest.mark.parametrize("source", [
    "from dreamerv4.evaluation.crafter import evaluate_crafter\n",
    "import dreamerv4.training.loop\n",
    "def late():\n    from dreamerv4.training import stages  # deferred\n    return stages\n",
    "if True:\n    from ..evaluation import metrics\n",
])
def test_the_checker_reports_a_forbidden_import(source):
    found = violations(source, "dreamerv4.data.latents")
    assert len(found) == 1 and found[0].startswith("dreamerv4.data.latents:")


def test_the_checker_allows_imports_downwards_and_within_a_layer():
    source = ("from dreamerv4.data.episodes import load_frames\nfrom dreamerv4.models import transformer\n"
              "from dreamerv4.training.stages import load_agent\nimport numpy\n")
    assert violations(source, "dreamerv4.training.dynamics") == []
    assert imported_modules("from dreamerv4.models import transformer\n", "dreamerv4.training.runtime") == \
        [(1, "dreamerv4.models.transformer")]


def test_the_run_config_loads_no_training_evaluation_or_command_code():
    # A fresh interpreter: the test session has imported everything already.
    probe = ("import sys, dreamerv4.run_config\n"
             "print('\\n'.join(m for m in sys.modules if m.startswith('dreamerv4.')))\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(SRC)})
    assert result.returncode == 0, result.stderr
    loaded = set(result.stdout.split())
    assert "dreamerv4.run_config" in loaded and "dreamerv4.training.config" in loaded
    heavy = {m for m in loaded if m.startswith(("dreamerv4.training.", "dreamerv4.evaluation", "dreamerv4.pipeline",
                                                 "dreamerv4.play", "dreamerv4.cli"))}
    assert heavy == {"dreamerv4.training.config"}, heavy
