"""The pluggy-based plugin system: hook specifications and the plugin manager.

Third-party packages add strategies or layer handlers by exposing a module with
``@gradproj.hookimpl`` functions under the ``gradproj`` entry-point group -- exactly the way the
built-ins are registered.
"""

from gradproj.plugins.hookspecs import hookimpl, hookspec
from gradproj.plugins.manager import Registry, get_plugin_manager, get_registry, refresh_registry, reset_plugin_manager

__all__ = ["hookimpl", "hookspec", "get_plugin_manager", "get_registry", "refresh_registry", "reset_plugin_manager", "Registry"]
