"""Encode: decoded batches -> vectors; models/ holds the model families."""
