"""Shared by the test-only sitecustomize hooks: patch a module right after it is first imported.

A meta-path finder that lets the normal finder locate `target`, then runs `patch(module)` once
the module has executed; processes that never import the target pay nothing."""
import importlib.abc
import importlib.machinery


class PatchOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, target: str, patch):
        self.target, self.patch = target, patch

    def find_spec(self, name, path=None, target=None):
        if name != self.target:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        original_exec = spec.loader.exec_module

        def exec_module(module):
            original_exec(module)
            self.patch(module)

        spec.loader.exec_module = exec_module
        return spec
