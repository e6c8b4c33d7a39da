"""Benchmarks: offline throughput (and, later, serving) on the fixed workloads of shared/BENCHMARKS.md."""
