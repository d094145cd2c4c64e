"""embindex: index folders of images into a searchable embedding table."""

__version__ = "0.1.0"
