"""Evaluation metrics: FID family, reconstruction metrics, alignment (CKNNA), latent statistics."""
