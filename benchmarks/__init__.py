"""fusedopt benchmarks and seed-experiment reproduction; run the modules with `python -m benchmarks.<name>`."""
