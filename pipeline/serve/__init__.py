"""`embindex serve`: an NVIDIA-NIM-compatible /v1/embeddings server for the configured encoder."""
