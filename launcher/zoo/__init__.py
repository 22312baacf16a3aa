"""Small built-in models and datasets for the shipped recipes, the tests and the benchmarks."""
