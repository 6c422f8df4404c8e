"""fastmaisi: fast, memory-bounded MAISI latent-diffusion generation of 3D CT/MR volumes."""

__version__ = "0.1.0"
