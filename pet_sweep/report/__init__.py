"""The report: it only reads a study and its MLflow runs, and loads neither torch nor fastai.

`read` opens the stores and hands plain records to `analysis` (the study), which reads each
trial with `verdicts` and puts numbers on its doubt with `stats`; `render` writes the text,
Markdown and HTML, `figures` the plots (the report's, and each trial's own while it trains).
"""

import sys
import types
from typing import Any

from pet_sweep import api as _api


class _CallableModule(types.ModuleType):
    """`pet_sweep.report(exp)` is the public API's report (`pet_sweep.api.report`): once a
    submodule is imported, Python binds the name `pet_sweep.report` to this package, so the
    package itself answers the call."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _api.report(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
