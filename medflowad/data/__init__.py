"""Data loading: natural-image sets (this module) and, later, medical scans."""

from medflowad.data.augment import random_hflip, random_translate
from medflowad.data.natural import DataError, ImageSet, load_image_set

__all__ = ["DataError", "ImageSet", "load_image_set", "random_hflip", "random_translate"]
