"""Canopy host toolchain: flash, monitor, repair and simulate canopy nodes."""

__version__ = "0.1.0"
