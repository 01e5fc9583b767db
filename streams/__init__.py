"""Kafka and Faust wiring: broker management, topics, the ingest agent, web views and the CLI."""
