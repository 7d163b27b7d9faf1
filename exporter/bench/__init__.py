"""Benchmarks: export cost, speed against peers, report files. Measurements only, never in tests' timing."""
