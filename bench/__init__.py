"""Ad-hoc measurements until `propstream bench` (benchmarks issue) replaces them."""
