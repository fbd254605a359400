"""Model code: networks only; no losses, no training loop."""
