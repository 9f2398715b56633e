"""Measured quality: metrics and virtual images, classical baselines, ``evaluate`` and the figures
(``denoised.png``, per-cycle images, the report)."""
