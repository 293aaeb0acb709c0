"""medflowad: likelihood-based anomaly detection with Glow, for brain MRI and natural images."""

__version__ = "0.1.0"
