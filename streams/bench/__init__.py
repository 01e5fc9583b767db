"""`propstream bench`: throughput, latency, memory and growth of the pipeline, with ratios in one run."""
