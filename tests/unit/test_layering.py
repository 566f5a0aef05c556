"""The package's layers: lower layers never import higher ones (every import, including those
inside functions), and the planner does arithmetic without importing a layer."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "tedmoe"
FORBIDDEN = {  # package -> modules it may not import (prefixes)
    "parallel": ("tedmoe.moe", "tedmoe.model", "tedmoe.runtime", "tedmoe.planner", "tedmoe.data"),
    "moe": ("tedmoe.model", "tedmoe.runtime", "tedmoe.planner", "tedmoe.data"),
    "model": ("tedmoe.runtime", "tedmoe.planner", "tedmoe.data"),
    "config": ("tedmoe.moe", "tedmoe.model", "tedmoe.runtime", "tedmoe.planner", "tedmoe.data", "tedmoe.parallel.comm",
               "tedmoe.parallel.launch", "tedmoe.parallel.sharding", "tedmoe.parallel.tensor_parallel",
               "tedmoe.parallel.activation_checkpoint", "tedmoe.parallel.ulysses"),  # topology: pure checks
    "data": ("tedmoe.parallel", "tedmoe.moe", "tedmoe.model", "tedmoe.runtime", "tedmoe.planner"),
    "planner": ("tedmoe.runtime", "tedmoe.model", "tedmoe.data", "tedmoe.moe.layer", "tedmoe.moe.router",
                "tedmoe.moe.dtd_dispatcher", "tedmoe.moe.experts", "tedmoe.parallel.tensor_parallel",
                "tedmoe.parallel.comm", "tedmoe.parallel.ulysses"),
    "runtime": ("tedmoe.inference", "tedmoe.examples", "tedmoe.cli"),  # training never needs the layers above it
    "inference": ("tedmoe.runtime.trainer", "tedmoe.examples", "tedmoe.cli"),
    "interop": ("tedmoe.runtime", "tedmoe.inference", "tedmoe.examples", "tedmoe.cli"),
    "compress": ("tedmoe.inference", "tedmoe.serve", "tedmoe.examples", "tedmoe.cli"),  # the engine loads it, not back
}


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_lower_layers_do_not_import_higher_ones(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in imports(path):
            if name.startswith(FORBIDDEN[package]):
                bad.append(f"{path.relative_to(ROOT.parent)} imports {name}")
    assert not bad, "\n".join(bad)


def test_paper_algorithms_stay_readable():
    """DTD (the dispatcher), CAC, the tiled ZeRO-1 step and Ulysses: one file each, under 400 lines."""
    for name in ("moe/dtd_dispatcher.py", "parallel/activation_checkpoint.py", "runtime/zero_optimizer.py",
                 "parallel/ulysses.py"):
        text = (ROOT / name).read_text()
        assert len(text.splitlines()) < 400, (name, len(text.splitlines()))
        assert "Other places" in text.split('"""')[1], f"{name}'s docstring should list the other places it touches"
