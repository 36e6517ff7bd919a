"""pyproject.toml declares exactly what the package imports: every third-party module `harness/` imports comes
from a declared distribution (core or an extra), and every core dependency is imported somewhere."""

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    return _normalise(re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0])


def declared() -> tuple[set[str], set[str]]:
    """(core dependencies, core + every extra), as normalised distribution names."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {_requirement_name(r) for r in project["dependencies"]}
    extras = {_requirement_name(r) for group in project["optional-dependencies"].values() for r in group}
    # ffcv and spikingjelly are installed by the Makefile with --no-deps; triton comes with torch's Linux wheels
    # (harness/snn/kernels/triton_neuron.py is imported on CUDA only)
    return core, core | extras | {"ffcv", "spikingjelly", "triton"}


def imported_modules() -> set[str]:
    """Top-level third-party modules imported anywhere in harness/."""
    names = set()
    for path in (REPO / "harness").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "harness"}


def test_every_imported_module_comes_from_a_declared_distribution():
    """Modules of extras that are not installed here (EXTRAS=dev: ffcv, deepspeed, tonic) have no provider to
    look up and are passed over; every other import must be covered."""
    _, allowed = declared()
    providers = packages_distributions()
    undeclared = {m: providers[m] for m in imported_modules()
                  if m in providers and not {_normalise(d) for d in providers[m]} & allowed}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


# dependencies used as programs, not imported: ninja builds the CPU fused neuron (torch.utils.cpp_extension runs it)
PROGRAMS = {"ninja"}


def test_every_core_dependency_is_imported():
    core, _ = declared()
    providers = packages_distributions()
    imported = {_normalise(d) for m in imported_modules() for d in providers.get(m, [])}
    assert core - imported - PROGRAMS == set(), "declared in pyproject.toml but imported nowhere in harness/"
