"""Minimal test-only stand-in for torchvision (see ../README.md). Not the real package."""

from torchvision import datasets, io, ops, transforms

__version__ = "0.0.0+fastcontrast.test.stub"

__all__ = ["datasets", "io", "ops", "transforms"]
