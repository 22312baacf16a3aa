"""Import paths in recipes: checked without importing (the submit path stays torch-free), resolved in workers.

`check(path)` finds the module's file through the import system's finders, without executing it, and reads its
source with `ast` to see that the name is defined there (following `from x import *`). Anything it cannot decide
statically (extension modules, a module-level `__getattr__`) is accepted here and checked again by the real import
in the launcher process before any worker starts.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.machinery
import importlib.util
import os
import sys
from typing import Any


def _find_spec(modname: str) -> importlib.machinery.ModuleSpec | None:
    """The spec of a (sub)module found without importing it or its parents."""
    if modname in sys.modules:
        return getattr(sys.modules[modname], "__spec__", None) or importlib.machinery.ModuleSpec(modname, None)
    parts = modname.split(".")
    spec = importlib.machinery.PathFinder.find_spec(parts[0], sys.path)
    if spec is None:
        try:  # builtins and frozen modules
            spec = importlib.util.find_spec(parts[0])
        except (ImportError, ValueError):
            spec = None
    for i in range(1, len(parts)):
        if spec is None or not spec.submodule_search_locations:
            return None
        spec = importlib.machinery.PathFinder.find_spec(".".join(parts[: i + 1]), list(spec.submodule_search_locations))
    return spec


@functools.lru_cache(maxsize=256)
def _module_names(origin: str) -> tuple[frozenset[str], tuple[str, ...], bool]:
    """Names a module file defines at top level, the modules it star-imports, and whether it has __getattr__."""
    with open(origin, "rb") as f:
        tree = ast.parse(f.read(), filename=origin)
    names: set[str] = set()
    stars: list[str] = []
    pkg_dir = os.path.dirname(origin)
    is_pkg = os.path.basename(origin) == "__init__.py"

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    for n in ast.walk(t):
                        if isinstance(n, ast.Name):
                            names.add(n.id)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    names.add(a.asname or a.name.split(".")[0])
            elif isinstance(node, ast.ImportFrom):
                for a in node.names:
                    if a.name == "*":
                        stars.append(_absolute(node.module, node.level, origin, is_pkg, pkg_dir))
                    else:
                        names.add(a.asname or a.name)
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                visit(node.body)
                for extra in ("orelse", "finalbody"):
                    visit(getattr(node, extra, []))
                for h in getattr(node, "handlers", []):
                    visit(h.body)
    visit(tree.body)
    return frozenset(names), tuple(s for s in stars if s), "__getattr__" in names


def _absolute(module: str | None, level: int, origin: str, is_pkg: bool, pkg_dir: str) -> str:
    if level == 0:
        return module or ""
    # Relative import: find the package name by walking up the directories that have __init__.py.
    parts: list[str] = []
    d = pkg_dir
    while os.path.exists(os.path.join(d, "__init__.py")):
        parts.insert(0, os.path.basename(d))
        d = os.path.dirname(d)
    base = parts[: len(parts) - (level - 1)] if level > 1 else parts
    return ".".join(base + ([module] if module else []))


def _defines(modname: str, attr: str, depth: int = 0) -> bool | None:
    """True/False when decidable from source; None when it cannot be known without importing."""
    spec = _find_spec(modname)
    if spec is None:
        return None
    if spec.submodule_search_locations and _find_spec(f"{modname}.{attr}") is not None:
        return True
    origin = spec.origin
    if not origin or not origin.endswith(".py") or not os.path.exists(origin):
        return None
    try:
        names, stars, dynamic = _module_names(origin)
    except (OSError, ValueError):
        return None
    if attr in names:
        return True
    undecided = dynamic
    if depth < 4:
        for star in stars:
            found = _defines(star, attr, depth + 1)
            if found:
                return True
            undecided = undecided or found is None
    return None if undecided else False


def check(path: Any) -> str | None:
    """A problem with an import path `pkg.module.Name`, or None when it looks importable."""
    if not isinstance(path, str) or not path or path.startswith(".") or path.endswith("."):
        return f"{path!r} is not an import path like 'package.module.Name'"
    parts = path.split(".")
    if _find_spec(path) is not None:
        return f"'{path}' names a module, not a class or function inside it"
    # The longest prefix that is a module; the next part must be a name in it.
    for i in range(len(parts) - 1, 0, -1):
        modname = ".".join(parts[:i])
        if _find_spec(modname) is not None:
            try:
                found = _defines(modname, parts[i])
            except SyntaxError as e:
                return f"module '{e.filename}' has a syntax error at line {e.lineno}: {e.msg} (from '{path}')"
            if found is False:
                return f"module '{modname}' has no name '{parts[i]}' (from '{path}')"
            return None
    return f"no module named '{parts[0]}' (from '{path}'); is the package installed, or its directory on PYTHONPATH?"


def locate(path: str) -> Any:
    """Import `pkg.module.Name` for real and return the object; errors name the module and the name."""
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        modname = ".".join(parts[:i])
        try:
            obj: Any = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name and (modname == e.name or modname.startswith(e.name + ".")):
                continue
            raise ImportError(f"importing '{modname}' for '{path}' failed: {e}") from e
        for attr in parts[i:]:
            try:
                obj = getattr(obj, attr)
            except AttributeError:
                raise ImportError(f"module '{modname}' has no name '{attr}' (from '{path}')") from None
        return obj
    raise ImportError(f"no module named '{parts[0]}' (from '{path}')")
