"""Plan a run: scan the roots, diff them against the index, find vectors that identical bytes can reuse."""
