"""Search the index by text, image or vector."""

from pipeline.search.query import Index, QueryError

__all__ = ["Index", "QueryError"]
