"""The package is layered: dataset → noise → splits → trainer → stack, methods → experiment → papers.

Every module of `noisyrepro/` imports only modules of its own layer or a lower one, and the four paper modules (peers in
the top layer) never import one another. Imports are read with `ast` over the whole file, so an import inside a function
counts, and so does a dynamic one: a string that is exactly a module's dotted name (`importlib.import_module("noisyrepro.x")`,
or a list of such names to import later)."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "noisyrepro"
LAYERS = [("core",), ("data",), ("noise",), ("splits",), ("models",), ("losses",), ("train",), ("stack", "baselines"), ("results",),
          ("experiment",), ("limit", "sln", "dmi", "cdr_aux")]        # lower first; the last layer: the paper modules, peers
PAPERS = set(LAYERS[-1])
LAYER = {m: i for i, names in enumerate(LAYERS) for m in names}
SKIP = {"__init__", "_modidx"}


def modules(pkg: Path = PKG) -> list[str]:
    "The package's modules by name (without `__init__` and nbdev's `_modidx`)."
    return sorted(p.stem for p in pkg.glob("*.py") if p.stem not in SKIP)


def _package_part(dotted: str) -> str | None:
    "'noisyrepro.x.y' -> 'x'; anything else -> None."
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "noisyrepro" else None


def imported(source: str) -> set[str]:
    "The first-level names under `noisyrepro` that `source` imports: module level, inside functions, relative, or by a dotted string."
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {m for a in node.names if (m := _package_part(a.name))}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module == "noisyrepro": found |= {a.name for a in node.names}     # from noisyrepro import x
            elif node.level == 0 and (m := _package_part(node.module or "")): found.add(m)             # from noisyrepro.x import y
            elif node.level == 1 and node.module: found.add(node.module.split(".")[0])                # from .x import y
            elif node.level == 1: found |= {a.name for a in node.names}                               # from . import x
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if (m := _package_part(node.value)) and node.value == f"noisyrepro.{m}": found.add(m)     # "noisyrepro.x": a dynamic import
    return found


def violations(pkg: Path = PKG) -> list[str]:
    "Every import that breaks the layering, as 'a imports b (...)' lines; modules without a layer are reported too."
    mods, out = modules(pkg), []
    for m in mods:
        if m not in LAYER: out.append(f"{m} has no layer: add it to tests/test_layers.py LAYERS"); continue
        for dep in sorted(imported((pkg / f"{m}.py").read_text()) & set(mods)):         # a name that is no module (e.g. a data folder) is no dependency
            if dep == m: continue
            if dep not in LAYER: continue                                                   # reported as 'has no layer' on its own line
            if m in PAPERS and dep in PAPERS: out.append(f"{m} imports {dep} (paper modules are peers: import from losses/baselines/train instead)")
            elif LAYER[dep] > LAYER[m]: out.append(f"{m} imports {dep}, a higher layer ({' < '.join('/'.join(l) for l in LAYERS)})")
    return out


def test_the_import_reader_sees_every_form():
    src = '''
import torch
from .train import Method
from . import splits, models
import noisyrepro.baselines
from noisyrepro import core
from noisyrepro.noise import corrupt_labels
def f():
    from noisyrepro.dmi import dmi_loss
    import importlib; importlib.import_module("noisyrepro.sln")
_LAZY = ["noisyrepro.cdr_aux"]
NOT_A_MODULE = "see noisyrepro.limit, noisyrepro.sln"
'''
    assert imported(src) == {"train", "splits", "models", "baselines", "core", "noise", "dmi", "sln", "cdr_aux"}


def test_every_module_has_a_layer():
    assert set(modules()) - SKIP <= set(LAYER), sorted(set(modules()) - set(LAYER))


def test_paper_modules_import_no_other_paper_module():
    bad = [v for v in violations() if "paper modules are peers" in v]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module", modules())
def test_module_imports_only_its_own_or_a_lower_layer(module):
    bad = [v for v in violations() if v.startswith(f"{module} ")]
    assert not bad, "\n".join(bad)
