"""Tests of pipeline.search."""
