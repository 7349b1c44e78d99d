"""specabund: stellar element abundances from LAMOST low-resolution spectra.

The Python interface (:mod:`specabund.api`), imported on first use so that ``import specabund`` stays fast::

    import specabund

    spectrum = specabund.read_lamost("spec-55859-F5902_sp01-001.fits.gz")
    model = specabund.load_model("MG_FE_20261129-101500", workdir="project")
    table = model.predict(["a.fits", "b.fits"], mc_samples=20)   # a pandas DataFrame

``simulate``, ``preprocess``, ``train``, ``evaluate`` (the ``test`` workflow) and ``predict`` do what the
commands of the same name do.

``simulate``, ``preprocess`` and ``predict`` are also the names of subpackages. Once a subpackage is
imported, Python binds its name on this package to the module; such a module is made callable (calling it
calls the function of :mod:`specabund.api`), so ``specabund.simulate(...)`` works either way while
``import specabund.simulate`` and ``from specabund.simulate import ...`` keep their meaning.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public names, all defined in :mod:`specabund.api`.
_API = (
    "Model",
    "evaluate",
    "load_model",
    "predict",
    "preprocess",
    "preprocess_spectrum",
    "read_lamost",
    "simulate",
    "train",
)

__all__ = [
    "Model",
    "__version__",
    "evaluate",
    "load_model",
    "predict",
    "preprocess",
    "preprocess_spectrum",
    "read_lamost",
    "simulate",
    "train",
]

if TYPE_CHECKING:  # pragma: no cover
    from .api import (
        Model,
        evaluate,
        load_model,
        predict,
        preprocess,
        preprocess_spectrum,
        read_lamost,
        simulate,
        train,
    )


#: Subpackages that share their name with a function of the API.
_CALLABLE_SUBPACKAGES = ("simulate", "preprocess", "predict")


class _CallableModule(types.ModuleType):
    """A subpackage that, called, runs the API function of its name (see the module docstring)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from . import api

        return getattr(api, self.__name__.rpartition(".")[2])(*args, **kwargs)


class _Package(types.ModuleType):
    """This package: makes the subpackages named in ``_CALLABLE_SUBPACKAGES`` callable when bound."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _CALLABLE_SUBPACKAGES and type(value) is types.ModuleType:
            value.__class__ = _CallableModule
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
for _name in _CALLABLE_SUBPACKAGES:  # bound before this module ran (e.g. by a re-import)
    if type(sys.modules.get(f"{__name__}.{_name}")) is types.ModuleType:
        sys.modules[f"{__name__}.{_name}"].__class__ = _CallableModule


def __getattr__(name: str) -> Any:
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'specabund' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
