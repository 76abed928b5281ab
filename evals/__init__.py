"""Anomaly scores and AUROC."""
