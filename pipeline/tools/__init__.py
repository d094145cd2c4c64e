"""Tools beside the pipeline: the batch-size benchmark and the synthetic corpus writer."""
