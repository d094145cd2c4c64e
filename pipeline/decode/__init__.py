"""Decode: one file -> the encoder's pixels or an error; the worker pool, the nvJPEG feed, pyramid tiles."""
