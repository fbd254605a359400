"""Datasets: all yield uint8 images [3,H,W] and integer labels."""
