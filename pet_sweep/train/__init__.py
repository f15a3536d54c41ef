"""The only place fastai trains: data, the tensor cache, the chapter-5 recipe, its
callbacks, the learning-rate finder and pretraining. Importing this package loads
nothing heavy; its modules import torch and fastai."""

import warnings


def quiet_fastai_import() -> None:
    """Hide the one upstream warning that every pet-sweep command would print: torch (2.10 on)
    deprecates `torch.jit.script`, which fastai calls for its own layers when it is imported.

    Called by pet-sweep's own processes (a command, a Ray worker), never on import: only that
    message from that torch module is hidden, and a notebook or the tests see every warning."""
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning,
                            module=r"torch\.jit\._script")
