"""Runs :func:`sqz_export.hf_quantizer.register` once transformers' quantizer registry exists.

A ``sys.meta_path`` finder waits for ``transformers.quantizers.auto`` (the module that holds the
registry) and registers right after it has executed; if it is already imported, registration
happens at once. Either way ``import sqz_export`` itself imports neither torch nor transformers.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

_REGISTRY = "transformers.quantizers.auto"


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path, target=None) -> importlib.machinery.ModuleSpec | None:  # noqa: ANN001
        if name != _REGISTRY:
            return None
        sys.meta_path.remove(self)  # one shot; the other finders now locate the real module
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: ModuleType) -> None:
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


def _register() -> None:
    from sqz_export import hf_quantizer

    hf_quantizer.register()


def install() -> None:
    if _REGISTRY in sys.modules:
        _register()
    elif not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
