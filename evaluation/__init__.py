"""Measuring detection quality: metrics, dataset readers, synthetic data, evaluation runs."""
