"""napari-jras: Joint Retrieval-Augmented Segmentation (J-RAS) for napari.

The compute core lives in :mod:`napari_jras.core` and never imports Qt.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
