"""The other tests: training loop, data, conversion CLI and saved models, benchmarks."""
