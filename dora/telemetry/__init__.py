"""Metrics, progress display, logging backends and timeline traces."""
