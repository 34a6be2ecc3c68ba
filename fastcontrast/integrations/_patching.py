"""The machinery behind the ``patch_*`` functions: the undo handle, option-carrying classes, name lookup.

Patching means rebinding module attributes. A library finds its loss classes through names bound in its
own modules (``open_clip.factory`` does ``from .loss import ClipLoss`` at import time, so rebinding
``open_clip.loss.ClipLoss`` alone would change nothing for ``create_loss``). So every module of the
library that currently binds the class is rebound, and :meth:`Patch.undo` puts back exactly what it replaced.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from types import ModuleType
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import fastcontrast


class Patch:
    """Handle for one ``patch_*`` call: :meth:`undo` restores the library's classes; also a context manager.

    ``with patch_open_clip(): ...`` patches for the block and undoes on exit (also when the block raises).
    Undo is idempotent. Nested patches should be undone in reverse order, as ``with`` blocks do; a name that
    was rebound again by someone else after this patch is left alone (with a ``RuntimeWarning``).

    Attributes:
        library: the patched library's import name (``"open_clip"``, ``"lightly"``, ...).
        patched: ``{"module.attribute": class now bound there}`` for every rebound name.
    """

    def __init__(self, library: str, bindings: Sequence[Tuple[ModuleType, str, object, type]]):
        self.library = library
        # (module, attribute, what it held before, what this patch put there)
        self._bindings: List[Tuple[ModuleType, str, object, type]] = list(bindings)
        self._active = True

    @property
    def active(self) -> bool:
        """True until :meth:`undo` has run."""
        return self._active

    @property
    def patched(self) -> Dict[str, type]:
        return {f"{module.__name__}.{name}": replacement for module, name, _, replacement in self._bindings}

    def undo(self) -> None:
        """Restore every name this patch rebound. Calling it again does nothing."""
        if not self._active:
            return
        self._active = False
        for module, name, original, replacement in reversed(self._bindings):
            if getattr(module, name, None) is not replacement:
                warnings.warn(
                    f"fastcontrast: {module.__name__}.{name} was rebound after this {self.library} patch; "
                    "leaving the newer binding in place (undo nested patches in reverse order).",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            setattr(module, name, original)

    def __enter__(self) -> Patch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.undo()

    def __repr__(self) -> str:
        state = "active" if self._active else "undone"
        return f"<fastcontrast Patch of {self.library} ({state}): {', '.join(self.patched) or 'nothing'}>"


def check_options(backend: str, chunk_bytes: Optional[int]) -> None:
    """Fail at patch time, not at the first loss construction deep inside a trainer."""
    if chunk_bytes is not None and (isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int)
                                    or chunk_bytes <= 0):
        raise ValueError(f"`chunk_bytes` must be None or a positive int (bytes of logits per chunk), "
                         f"got {chunk_bytes!r}.")
    # The losses validate `backend` at construction; borrow that check so the message is theirs.
    fastcontrast.ClipLoss(backend=backend, chunk_bytes=chunk_bytes)


def with_options(cls: type, backend: str, chunk_bytes: Optional[int]) -> type:
    """``cls`` itself for the default options, else a subclass whose constructor defaults to them.

    The subclass keeps ``cls``'s name, qualified name, module and docstring, so trainers that log or compare
    class names see the fastcontrast class; an explicit ``backend=`` / ``chunk_bytes=`` argument still wins.
    Its instances pickle (and deep-copy) as plain ``cls`` instances, which hold the options as attributes, so
    unpickling does not need the patch.
    """
    if backend == "auto" and chunk_bytes is None:
        return cls
    defaults = {"backend": backend, "chunk_bytes": chunk_bytes}

    class Configured(cls):  # type: ignore[valid-type, misc]
        fastcontrast_defaults = dict(defaults)

        def __init__(self, *args, **kwargs):
            for key, value in defaults.items():
                kwargs.setdefault(key, value)
            super().__init__(*args, **kwargs)

        def __reduce_ex__(self, protocol):
            reduced = super().__reduce_ex__(protocol)
            # pickle finds a class by module + qualified name, which name `cls`, not this per-call subclass.
            if type(self) is Configured and isinstance(reduced, tuple) and len(reduced) >= 2 and reduced[1] \
                    and reduced[1][0] is Configured:
                reduced = (new_instance, (cls,), *reduced[2:])
            return reduced

    for attribute in ("__name__", "__qualname__", "__module__", "__doc__"):
        setattr(Configured, attribute, getattr(cls, attribute))
    return Configured


def new_instance(cls: type) -> object:
    """Unpickling helper: an empty ``cls`` instance that pickle then fills with the saved state."""
    return cls.__new__(cls)


def import_library(module: str, pip_name: str, function: str) -> ModuleType:
    """Import ``module`` for ``function``, with an ImportError that says what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        library = module.split(".")[0]
        missing = (exc.name or "").split(".")[0]
        if missing == library:
            raise ImportError(
                f"fastcontrast.integrations.{function}() needs {library}, which is not installed: "
                f"pip install {pip_name}"
            ) from exc
        # The library is there but one of its own imports failed: say so instead of blaming the library.
        hint = f" Install its missing dependency ({missing})." if missing else ""
        raise ImportError(
            f"fastcontrast.integrations.{function}(): {library} is installed but does not import ({exc}).{hint}"
        ) from exc


def patch_names(
    library: str,
    names: Iterable[Tuple[str, str, type]],
    lookup_modules: Sequence[str],
    package_prefixes: Sequence[str],
) -> Patch:
    """Rebind each ``(defining_module, name, replacement)`` everywhere ``library`` looks it up.

    ``lookup_modules`` are imported and rebound if they hold ``name``. Every other already-imported module
    under ``package_prefixes`` that binds the *same object* as the defining module (``from x import Name``
    copies the binding) is rebound too, so no reference in the library is missed. Modules imported later
    pick the patched class up through their own ``from ... import``.
    """
    bindings: List[Tuple[ModuleType, str, object, type]] = []
    seen = set()
    for defining, name, replacement in names:
        current = getattr(importlib.import_module(defining), name)
        targets = [importlib.import_module(m) for m in (defining, *lookup_modules)]
        targets += [
            module for module_name, module in list(sys.modules.items())
            if module is not None and any(module_name == p or module_name.startswith(p + ".") for p in package_prefixes)
            and getattr(module, name, None) is current
        ]
        for module in targets:
            if (module.__name__, name) in seen or not hasattr(module, name):
                continue
            seen.add((module.__name__, name))
            bindings.append((module, name, getattr(module, name), replacement))
    for module, name, _, replacement in bindings:
        setattr(module, name, replacement)
    return Patch(library, bindings)
