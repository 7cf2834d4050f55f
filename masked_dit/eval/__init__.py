"""Evaluation: FID/IS/precision/recall, the offline digits metric, and pictures."""
