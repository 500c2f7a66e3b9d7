"""overlayctl: system and configuration extensions with mutable overlays."""

__version__ = "0.1.0"
