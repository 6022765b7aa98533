"""The native model types (`mobe_<family>`) known to transformers from `import mobe` on, at no import cost.

transformers resolves a checkpoint's `model_type` through `CONFIG_MAPPING` (`models/auto/configuration_auto.py`),
a lazy mapping of type names to config classes whose registered entries (`AutoConfig.register`) live in a plain
dict, `CONFIG_MAPPING._extra_content`. Registering every family's native classes up front (runtime/auto.py) builds
~30 classes and imports their modeling modules, seconds that `mobe --help` or `import mobe` should not pay. So
`import mobe` imports neither torch nor transformers: once transformers' configuration_auto module is imported (now,
if it already is, or later through an import hook), that dict becomes a `NativeTypes`, which also answers for a
`mobe_*` type, registering that family's classes (config and causal LM, runtime/auto.py) the first time
transformers looks it up. A native checkpoint therefore opens in `AutoModelForCausalLM.from_pretrained` after
`import mobe`, as it did when the registration was eager; without mobe imported transformers refuses it.

This module imports nothing but the standard library.
"""

from __future__ import annotations

import importlib.abc
import sys
from typing import Any

TARGET = "transformers.models.auto.configuration_auto"
PREFIX = "mobe_"  # architectures.NATIVE_MODEL_TYPE_PREFIX (a test keeps them equal; that package imports torch)


class NativeTypes(dict):
    """transformers' registered config classes, plus every native type, registered on its first lookup."""

    def __init__(self, entries: dict) -> None:
        super().__init__(entries)
        self._tried: set[str] = set()

    def _known(self, key: Any) -> bool:
        if dict.__contains__(self, key):
            return True
        if not isinstance(key, str) or not key.startswith(PREFIX) or key in self._tried:
            return False
        self._tried.add(key)  # once: a family transformers lacks stays unknown, and lookups cannot recurse
        from .runtime.auto import register_native_type

        register_native_type(key)  # AutoConfig.register stores the class here
        return dict.__contains__(self, key)

    def __contains__(self, key: object) -> bool:
        return self._known(key)

    def __getitem__(self, key: Any) -> Any:
        self._known(key)
        return dict.__getitem__(self, key)

    def get(self, key: Any, default: Any = None) -> Any:
        return dict.__getitem__(self, key) if self._known(key) else default


def _patch(module: Any) -> None:
    """Make `module.CONFIG_MAPPING` (transformers' configuration_auto) answer for the native types."""
    mapping = getattr(module, "CONFIG_MAPPING", None)
    extra = getattr(mapping, "_extra_content", None)
    if isinstance(extra, dict) and not isinstance(extra, NativeTypes):
        mapping._extra_content = NativeTypes(extra)


class _PatchingLoader(importlib.abc.Loader):
    """The configuration_auto module's own loader, then `_patch` once the module has run."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self.loader  # the module keeps its real loader
        self.loader.exec_module(module)
        _patch(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds transformers' configuration_auto with the other finders, and wraps its loader (a reload too)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        for finder in [f for f in sys.meta_path if f is not self]:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


def install() -> None:
    """Patch transformers' CONFIG_MAPPING now if configuration_auto is imported, else when it is (idempotent)."""
    module = sys.modules.get(TARGET)
    if module is not None:
        _patch(module)
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
