"""Tests of pipeline.decode."""
