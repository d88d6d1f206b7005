"""Accuracy and fidelity metrics, and the quality gate."""
