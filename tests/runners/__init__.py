"""Tests of pipeline.runners."""
