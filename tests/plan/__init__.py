"""Tests of pipeline.plan."""
