"""Editing methods as components: one module per method, found through :mod:`.registry`."""

from blueedit.methods.registry import EditMethod, SolveInputs, get_method, method_names, register

__all__ = ["EditMethod", "SolveInputs", "get_method", "method_names", "register"]
