"""Package namespaces whose names are imported on first use (PEP 562)."""

import importlib

__all__ = ["lazy_names"]


def lazy_names(package: str, namespace: dict, exports: dict[str, str]):
    """The ``__getattr__`` and ``__dir__`` of a package whose public names live
    in its submodules and are imported when first looked up.

    Args:
        package: The package's ``__name__``.
        namespace: Its ``globals()`` (a looked-up name is kept there, so later
            lookups skip ``__getattr__``).
        exports: Public name -> the submodule (relative to ``package``) defining it.

    Returns:
        ``(__getattr__, __dir__)`` to assign in the package.
    """

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        namespace[name] = value
        return value

    def __dir__():
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
