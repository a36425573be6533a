"""dptrain: data-parallel neural-network training on NumPy/CuPy and MPI."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .inference import Predictor

__version__ = "0.1.0"


def load_model(path: str, device: str = "cpu") -> Predictor:
    """A saved model (model.h5 or any checkpoint) ready for ``predict(x, batch_size=)``:
    see dptrain/inference.py."""
    from .inference import load_model as load  # noqa: PLC0415  (keeps `import dptrain` light)

    return load(path, device)
