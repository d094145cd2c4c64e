"""The index: sinks (LanceDB, Parquet), shard commits, identity, history, the lock, ANN upkeep."""
