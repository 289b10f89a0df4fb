"""Fused GPU kernels (Triton). Imported lazily: CPU installs have no Triton."""
