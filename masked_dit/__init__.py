"""masked-dit: fast training and sampling of masked diffusion transformers."""
__version__ = "0.1.0"
