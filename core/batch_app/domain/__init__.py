"""What every process shares: the queue protocols, batches, files, the worker registry, the schema."""
