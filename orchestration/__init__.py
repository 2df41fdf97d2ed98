"""Config, CLI, run directory, MLflow, Ray and serving: everything that is not a pure component."""

import os as _os
import sys as _sys


def _drop_shadowing_paths() -> None:
    """A run directory holds folders named like the stage packages (``clustering/``,
    ``specialists/``, ...). Python (and Ray workers, which inherit the driver's working directory)
    put the working directory on ``sys.path``; when that is a run directory those folders would
    shadow the real packages as empty namespace packages. Drop such entries."""
    cwd = _os.getcwd()
    shadowing = [name for name in ("generalist", "clustering", "specialists", "distill")
                 if _os.path.isdir(_os.path.join(cwd, name))
                 and not _os.path.exists(_os.path.join(cwd, name, "__init__.py"))]
    if not shadowing:
        return
    _sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or ".") != cwd]
    for name in shadowing:
        module = _sys.modules.get(name)
        if module is not None and getattr(module, "__file__", None) is None:
            del _sys.modules[name]


_drop_shadowing_paths()
