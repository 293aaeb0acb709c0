"""Brain-MRI pipeline: general scan pool, two-model training, calibrated scoring with NIfTI maps."""
