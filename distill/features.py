"""Capture intermediate activations by dotted module path with forward hooks.

Models need no rewriting: ``FeatureExtractor(model, ["blocks.2", "head.fc"])`` hooks
``model.get_submodule("blocks.2")`` etc.  Typical use::

    with FeatureExtractor(student, ["layer3"]) as fs, FeatureExtractor(teacher, ["layer3"]) as ft:
        logits_s = student(x)
        with torch.no_grad():
            logits_t = teacher(x)
        loss = hint(fs.features["layer3"], ft.features["layer3"])
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["FeatureExtractor"]

CAPTURE_MODES = ("output", "input")


def _unknown_path_error(model: nn.Module, path: str, names: list[str]) -> ValueError:
    close = difflib.get_close_matches(path, names, n=5, cutoff=0.5)
    shown = close if close else [n for n in names if n][:8]
    kind = "closest matches" if close else "some valid paths"
    return ValueError(
        f"unknown module path {path!r} in {type(model).__name__}; {kind}: {shown}. "
        "Use a dotted name from model.named_modules() (a DDP/DataParallel wrapper adds "
        "a 'module.' prefix)"
    )


class FeatureExtractor:
    """Context manager that records module activations from the last forward pass.

    Args:
        model: the root module; its paths are those of ``model.named_modules()``
            (``""`` is the model itself).
        module_paths: dotted paths such as ``"blocks.2"`` or ``"blocks.1.conv2"``.
        detach: store detached tensors (for a teacher you run without no_grad).
            Keep False for the student so the losses backpropagate.
        capture: ``"output"`` stores each module's output; ``"input"`` stores its first
            positional input (e.g. the features entering the final classifier).

    ``features`` maps path -> tensor.  It is cleared at the start of every forward of
    ``model``, so it only holds activations of the latest forward; a module called
    several times in one forward keeps its last call.  A module returning a tuple or
    list has its first element stored.  Hooks are registered on ``__enter__`` and
    removed on ``__exit__`` (or :meth:`remove`); ``features`` stays readable after.
    """

    def __init__(
        self,
        model: nn.Module,
        module_paths: Sequence[str],
        *,
        detach: bool = False,
        capture: str = "output",
    ) -> None:
        if isinstance(module_paths, str):
            raise ValueError(
                f"module_paths must be a sequence of dotted paths, not the single string "
                f"{module_paths!r}; wrap it in a list: [{module_paths!r}]"
            )
        if capture not in CAPTURE_MODES:
            raise ValueError(f"capture must be one of {CAPTURE_MODES}, got {capture!r}")
        paths = list(dict.fromkeys(module_paths))
        if not paths:
            raise ValueError("module_paths is empty; name at least one module, e.g. ['layer3']")
        modules = dict(model.named_modules())
        names = list(modules)
        for path in paths:
            if not isinstance(path, str) or path not in modules:
                raise _unknown_path_error(model, str(path), names)
        self.model = model
        self.module_paths: tuple[str, ...] = tuple(paths)
        self.detach = detach
        self.capture = capture
        self.features: dict[str, Tensor] = {}
        self._modules = {path: modules[path] for path in paths}
        self._handles: list[RemovableHandle] = []

    @property
    def active(self) -> bool:
        """True while hooks are registered."""
        return bool(self._handles)

    def _store(self, path: str, value: Any) -> None:
        if isinstance(value, list | tuple) and value:
            value = value[0]
        if not isinstance(value, Tensor):
            raise ValueError(
                f"module {path!r} produced a {type(value).__name__} as its "
                f"{self.capture}, not a tensor; hook a submodule that returns a tensor"
            )
        self.features[path] = value.detach() if self.detach else value

    def _make_hook(self, path: str):  # noqa: ANN202 - hook signature varies by capture mode
        if self.capture == "output":

            def hook(module: nn.Module, args: Any, output: Any) -> None:
                self._store(path, output)

        else:

            def hook(module: nn.Module, args: Any, output: Any) -> None:
                self._store(path, args)

        return hook

    def __enter__(self) -> FeatureExtractor:
        if self.active:
            raise ValueError("FeatureExtractor is already active; do not enter it twice")
        self.features.clear()
        self._handles.append(
            self.model.register_forward_pre_hook(lambda module, args: self.features.clear())
        )
        for path, module in self._modules.items():
            self._handles.append(module.register_forward_hook(self._make_hook(path)))
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove all hooks (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
