"""dptrain: data-parallel neural-network training on NumPy/CuPy and MPI."""

__version__ = "0.1.0"
