"""Benchmark: the engine against the one-pipeline-call-per-message baseline (`python -m bench`)."""
