"""Synthetic grounding task generators (line intersection, line tracing, grid patch) and their CLI."""
