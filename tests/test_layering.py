"""The package's layering (CONTRIBUTING.md): no module imports upward."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "lora_ckpt"

# Lower numbers sit lower; a module may import only from its level or below.
LEVELS = {
    "errors": 0,
    "version": 0,
    "_tf": 1,
    "storage": 1,
    "layers": 2,
    "traversal": 3,
    "selection": 4,
    "registry": 5,
    "graph_models": 5,
    "subclassed_models": 5,
    "architectures": 5,
    "models": 6,
    "synthetic": 6,
    "state": 7,
    "serving": 8,
    "export": 9,
    "demo": 9,
    "cli": 10,
}
PURE_PYTHON = {"errors", "version", "serving/slot_table"}
NO_TENSORFLOW = ["storage", "state/files.py", "state/inspect.py", "state/atomic.py"]


def _top(module: pathlib.Path) -> str:
    return module.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imports(module: pathlib.Path):
    """``(top-level package module, line)`` of every lora_ckpt import in a file."""
    tree = ast.parse(module.read_text())
    parts = module.relative_to(PACKAGE).with_suffix("").parts
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(parts[: len(parts) - node.level])
            target = [*base, *(node.module.split(".") if node.module else [])]
            names = [target] if target else [[alias.name] for alias in node.names]
            for name in names:
                yield name[0], node.lineno
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            )
            for name in modules:
                if name and name.startswith("lora_ckpt."):
                    yield name.split(".")[1], node.lineno


def test_every_package_module_has_a_level():
    tops = {
        _top(m) for m in PACKAGE.rglob("*.py") if m.name != "__init__.py" or m.parent != PACKAGE
    }
    assert tops <= set(LEVELS), sorted(tops - set(LEVELS))


def test_no_module_imports_upward():
    upward = []
    for module in PACKAGE.rglob("*.py"):
        if module.parent == PACKAGE and module.name == "__init__.py":
            continue  # the public namespace gathers every level
        level = LEVELS[_top(module)]
        for target, line in _imports(module):
            if LEVELS.get(target, -1) > level:
                upward.append(f"{module.relative_to(PACKAGE)}:{line} imports {target}")
    assert upward == []


def test_pure_python_modules_import_no_tensorflow_or_numpy():
    for name in PURE_PYTHON:
        source = (PACKAGE / f"{name}.py").read_text()
        tree = ast.parse(source)
        imported = {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        } | {
            node.module.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module and not node.level
        }
        assert not imported & {"tensorflow", "numpy", "tf_keras", "tfimm"}, name
        relative = {
            node.module
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level
        }
        assert relative <= {"errors", None}, (name, relative)
