"""sait_tf: Semantically Adaptive Image-to-image Translation (Musto & Zinelli, BMVC 2020)."""

__version__ = "0.1.0"
