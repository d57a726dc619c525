"""The shape of the code (``docs/architecture.md``): ``secagg/crypto`` in layers, each importing
only those below it, and no import cycle anywhere in ``secagg``.

A new module of ``secagg/crypto`` must be placed in a layer here (the test says so by name),
which is where a reader of the architecture page looks for it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "secagg"

#: ``secagg/crypto``'s layers, lowest first; a module imports only from its layer or below.
LAYERS = [
    ("ring arithmetic", {"ring", "ntt", "seeded"}),
    ("the RLWE scheme and SEAL's format", {"seal_format", "params", "caches", "rlwe"}),
    ("the codec: quantization and packing", {"packing", "codec"}),
    (
        "the protocol: envelope, ledger, tag, reports, masks, shares, policy, identities",
        {
            "envelope",
            "integrity",
            "ledger",
            "report",
            "shares",
            "neighbours",
            "policy",
            "masking",
            "certified",
        },
    ),
    ("the ciphers", {"ckks", "ckks_server", "plain", "quantized", "__init__"}),
]
#: What the layers below the ciphers may import from outside ``secagg/crypto``: the errors,
#: and atomic file writes (a kit's policy).
BASE = {"secagg.errors", "secagg.files"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, modules: set[str], *, top_level: bool) -> set[str]:
    """The ``secagg`` modules ``path`` imports (a name imported from a package counts as its
    submodule when there is one), leaving out ``if TYPE_CHECKING:`` blocks, and with
    ``top_level`` the imports inside functions (run on first use, after every import)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import | ast.ImportFrom) and not (top_level and in_function):
                found.update(_targets(child, modules))
            visit(child, nested)

    visit(tree, False)
    return found


def _targets(node: ast.Import | ast.ImportFrom, modules: set[str]) -> set[str]:
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in modules}
    assert not node.level, "secagg imports absolutely"
    base = node.module or ""
    out = set()
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        if sub in modules:
            out.add(sub)
        elif base in modules:
            out.add(base)
    return out


def test_every_crypto_module_is_in_one_layer_and_imports_only_downward() -> None:
    modules = _modules()
    layer_of = {name: index for index, (_, names) in enumerate(LAYERS) for name in names}
    crypto = {p.stem: p for p in (PACKAGE / "crypto").glob("*.py")}
    unplaced = sorted(set(crypto) - set(layer_of))
    assert not unplaced, f"place {unplaced} in a layer of tests/test_layers.py (and the docs)"
    upward = []
    for stem, path in crypto.items():
        for target in _imports(path, set(modules), top_level=False):
            if target.startswith("secagg.crypto."):
                other = target.removeprefix("secagg.crypto.")
                if layer_of[other] > layer_of[stem]:
                    upward.append(f"{stem} ({LAYERS[layer_of[stem]][0]}) imports {other}")
            elif target == "secagg.crypto":
                if layer_of[stem] < len(LAYERS) - 1:
                    upward.append(f"{stem} imports the package secagg.crypto")
            elif layer_of[stem] < len(LAYERS) - 1 and target not in BASE:
                upward.append(f"{stem} ({LAYERS[layer_of[stem]][0]}) imports {target}")
    assert not upward, upward


def test_no_import_cycle_in_secagg() -> None:
    """The module-level imports of every ``secagg`` module form no cycle (the imports a
    function makes on first use are left out: they run once every module is loaded)."""
    modules = _modules()
    graph = {
        name: _imports(path, set(modules), top_level=True) - {name}
        for name, path in modules.items()
    }
    done: set[str] = set()
    path: list[str] = []

    def walk(name: str) -> None:
        if name in path:
            cycle = [*path[path.index(name) :], name]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        path.append(name)
        for target in sorted(graph.get(name, ())):
            walk(target)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        walk(name)
    assert len(done) == len(graph)
