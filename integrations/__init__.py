"""Integrations of gradproj with training frameworks, importable as ``gradproj.integrations.<name>``.

The core (``gradproj``) never imports from here.
"""
