"""Builds the plugin manager once per process and resolves strategies and layer handlers.

Plugins are discovered through the ``gradproj`` entry-point group. The built-in plugins are
declared there too (see ``pyproject.toml``); when gradproj runs from a source tree that was not
installed, the same built-in modules are registered by name so behaviour does not change.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass, field

import pluggy

from gradproj.errors import ConfigError
from gradproj.plugins import hookspecs

__all__ = ["get_plugin_manager", "get_registry", "refresh_registry", "reset_plugin_manager", "Registry", "BUILTIN_PLUGINS"]

#: name -> module of the plugins that ship with gradproj (also declared as entry points).
BUILTIN_PLUGINS = {
    "none": "gradproj.strategies.none",
    "proma": "gradproj.strategies.proma",
    "variance_scaling": "gradproj.strategies.variance_scaling",
    "isopo": "gradproj.strategies.isopo",
    "intra_proma": "gradproj.strategies.intra_proma",
    "linear": "gradproj.capture.handlers",
    "norms": "gradproj.capture.norm_handlers",
    "embedding": "gradproj.capture.embedding_handler",
    "functional_linear": "gradproj.capture.functional_linear",
    "experts": "gradproj.capture.experts_handler",
    "param_lora": "gradproj.capture.param_lora",
    "attention_sinks": "gradproj.capture.attention_sinks",
}

_lock = threading.Lock()
_manager: pluggy.PluginManager | None = None
_registry: Registry | None = None


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager (entry points loaded, built-ins registered)."""
    global _manager
    with _lock:
        if _manager is None:
            pm = pluggy.PluginManager(hookspecs.PROJECT)
            pm.add_hookspecs(hookspecs)
            pm.load_setuptools_entrypoints(hookspecs.PROJECT)
            for name, module in BUILTIN_PLUGINS.items():
                if pm.get_plugin(name) is None and not pm.is_blocked(name):
                    pm.register(importlib.import_module(module), name=name)
            _manager = pm
        return _manager


def refresh_registry() -> None:
    """Rebuild the strategy/handler registry on next use (after ``register``/``unregister``)."""
    global _registry
    with _lock:
        _registry = None


def reset_plugin_manager() -> None:
    """Forget the cached manager and registry (after registering or unregistering plugins)."""
    global _manager, _registry
    with _lock:
        _manager = None
        _registry = None


@dataclass
class Registry:
    """Strategies by name and layer handlers, resolved from all plugins."""

    strategies: dict = field(default_factory=dict)
    handlers: list = field(default_factory=list)

    def strategy(self, name: str):
        """The `StrategySpec` called ``name``; unknown names list the valid ones."""
        try:
            return self.strategies[name]
        except KeyError:
            valid = ", ".join(sorted(self.strategies))
            raise ConfigError(
                f"unknown gradproj strategy {name!r}; valid strategies are: {valid}. "
                "Third-party strategies must be installed as a 'gradproj' entry point "
                "or registered with gradproj.get_plugin_manager().register(...)."
            ) from None

    def handler_for(self, module):
        """The handler covering ``module``, or ``None``: the handler registered for the most specific
        type in the module's MRO (one handler per type: two claiming the same type are refused when
        the registry is built), if it `accepts` the module; otherwise the first *structural*
        handler (``structural = True``, registration order) that recognises the module by what it
        computes."""
        best, best_depth = None, None
        mro = type(module).__mro__
        for handler in self.handlers:
            for module_type in handler.module_types:
                if module_type in mro:
                    depth = mro.index(module_type)
                    if best_depth is None or depth < best_depth:
                        best, best_depth = handler, depth
        if best is not None and best.accepts(module):
            return best
        for handler in self.handlers:
            if getattr(handler, "structural", False) and handler is not best and handler.accepts(module):
                return handler
        return None


def get_registry() -> Registry:
    """Resolve every plugin's strategies and handlers once (cached until reset)."""
    global _registry
    pm = get_plugin_manager()
    with _lock:
        if _registry is not None:
            return _registry
        registry = Registry()
        owners: dict[str, str] = {}
        for plugin_specs in pm.hook.gradproj_strategies():
            for spec in plugin_specs or ():
                if spec.name in registry.strategies:
                    raise ConfigError(
                        f"two plugins define the gradproj strategy {spec.name!r} "
                        f"({owners[spec.name]} and {spec.cls.__module__}); uninstall or block one "
                        "of them with get_plugin_manager().set_blocked(name)."
                    )
                registry.strategies[spec.name] = spec
                owners[spec.name] = spec.cls.__module__
        claims: dict[type, object] = {}
        for plugin_handlers in pm.hook.gradproj_layer_handlers():
            for handler in plugin_handlers or ():
                for module_type in handler.module_types:
                    other = claims.setdefault(module_type, handler)
                    if other is not handler:
                        raise ConfigError(
                            f"two layer handlers claim {module_type.__module__}.{module_type.__qualname__} modules: "
                            f"{type(other).__module__}.{type(other).__name__} and {type(handler).__module__}."
                            f"{type(handler).__name__}; a module type has one handler (a handler for a subclass "
                            "takes precedence over one for its base class). Uninstall or block one of the plugins "
                            "with get_plugin_manager().set_blocked(name)."
                        )
                registry.handlers.append(handler)
        _registry = registry
        return registry
