"""A tiny TFDS dataset for tests; TFDS wants each builder class in its own module folder."""

from tfds_tiny.tiny_text import DOCUMENTS, TinyText

__all__ = ["DOCUMENTS", "TinyText"]
