"""Benchmarks that reproduce PROTOCOL.md as commands."""
