"""Tests of pipeline.encode."""
