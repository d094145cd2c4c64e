"""Tests of pipeline.index."""
