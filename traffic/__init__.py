"""Traffic sources: the ground-truth simulator and readers for real public event logs (pure, no Kafka)."""
