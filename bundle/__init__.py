"""Invertible Diffusion Model (IDM) MONAI bundle."""

__version__ = "0.1.0"
