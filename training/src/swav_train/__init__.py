"""SwAV (Caron et al. 2020) trainer for the swav image embedding server."""

__version__ = "0.1.0"
