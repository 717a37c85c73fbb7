"""Benchmarks run against the local RabbitMQ and PostgreSQL (not tests)."""
