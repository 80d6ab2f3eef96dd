"""asv benchmarks for embbench: speed, memory and accuracy of every registered scheme (see docs/benchmarks.md)."""
