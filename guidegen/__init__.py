"""guidegen: text-guided paired full-torso label map and CT volume generation."""

__version__ = "0.1.0"
