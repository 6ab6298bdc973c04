"""What the tests, the demo and the benchmarks build to run the product's real code paths offline: tiny random models of
every family (`tiny_models`). Nothing in the product imports this package."""
