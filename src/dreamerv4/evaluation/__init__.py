"""Evaluation: image metrics, Crafter cell classifier, per-stage reports."""
