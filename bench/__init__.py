"""Benchmarks of NexusCore on a real Kafka broker (``python -m bench.pipeline``)."""
