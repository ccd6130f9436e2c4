"""ognet: distributed training and evaluation of OG-Net for point-cloud person re-identification."""

__version__ = "0.1.0"
