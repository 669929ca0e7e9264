"""Plain PyTorch models used by the examples, tests and benchmarks (no parallelism here)."""
