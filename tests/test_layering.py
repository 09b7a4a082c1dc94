"""The package's layering (CONTRIBUTING.md): no module imports upward, and no
two modules import each other in a cycle."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "lora_ckpt"

# Lower numbers sit lower; a module may import only from its level or below.
LEVELS = {
    "errors": 0,
    "version": 0,
    "_keras_env": 0,
    "_lazy": 0,
    "scaling": 0,
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
    "model_build": 6,
    "model_ops": 6,
    "tfimm_lora_models": 6,
    "synthetic": 6,
    "preprocessing": 6,
    "state": 7,
    "serving": 8,
    "export": 9,
    "demo": 9,
    "training": 9,
    "cli": 10,
    "cli_store": 10,
    "cli_train": 10,
}
PURE_PYTHON = {
    "errors",
    "version",
    "_keras_env",
    "_lazy",
    "scaling",
    "serving/slot_table",
    "serving/auth",
    "serving/tfserving",
    "serving/quotas",
    "serving/fair_queue",
}


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
        # Relative imports reach only errors, or another module of this set (checked too).
        siblings = {
            p.rsplit("/", 1)[-1]
            for p in PURE_PYTHON
            if p.rsplit("/", 1)[0] == name.rsplit("/", 1)[0]
        }
        assert relative <= {"errors", None} | siblings, (name, relative)


# ---- module-level cycles ----
#
# A cycle is two or more modules that reach each other through import
# statements, wherever the statement sits: one inside a function (a "lazy"
# import) only hides a cycle until that function runs, so it counts too.
# Imports under `if TYPE_CHECKING:` never run and do not count. Edges are the
# imports a module writes, not the parent packages Python imports on the way
# (every `lora_ckpt.state.x` would otherwise form a cycle with
# `lora_ckpt/state/__init__.py`, which re-exports it); a package's own
# `__init__` is a node of its own.


def _module_name(path: pathlib.Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def _is_type_checking_block(node) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _import_nodes(tree):
    """Every import statement of a module, in functions too, outside TYPE_CHECKING blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if _is_type_checking_block(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _module_graph() -> dict[str, set[str]]:
    """``module -> modules it imports``, over every module of lora_ckpt."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}

    def resolve(name):
        for candidate in (name, f"{name}.__init__"):
            if candidate in modules:
                return candidate
        return None

    graph = {}
    for name, path in modules.items():
        # What a relative import is relative to: a package's __init__ is in it.
        if name.endswith(".__init__"):
            package = name.removesuffix(".__init__")
        else:
            package = name.rsplit(".", 1)[0]
        targets = set()
        for node in _import_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {resolve(alias.name) for alias in node.names}
                continue
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - (node.level - 1)]
                module = ".".join(base + (node.module.split(".") if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import sub` imports the module pkg.sub; `from pkg import name`
            # imports pkg itself.
            submodules = [resolve(f"{module}.{alias.name}") for alias in node.names]
            targets |= set(submodules)
            if not all(submodules):
                targets.add(resolve(module))
        graph[name] = {t for t in targets if t and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_lazy_imports_of_the_package_namespace_are_not_edges():
    # lora_ckpt/__init__.py imports on first use through importlib, and its
    # TYPE_CHECKING imports never run: it reaches no module by a statement
    # that runs, so nothing can form a cycle through it.
    assert _module_graph()["lora_ckpt.__init__"] <= {"lora_ckpt._keras_env"}


def test_no_two_modules_import_each_other():
    assert _cycles(_module_graph()) == []
