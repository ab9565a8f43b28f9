"""Settings and image validation shared by orchestrator and workers (no torch)."""
