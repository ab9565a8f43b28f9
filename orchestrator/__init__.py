"""Accepts frames, records inspections, sends stage chains by name (never imports torch)."""
