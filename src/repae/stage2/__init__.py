"""Stage 2 of REPA-E: the tuned VAE ("E2E-VAE") as a drop-in for latent diffusion training.

export.py    `repae export-vae`: a run's VAE + EMA latent-BN statistics, in our, the official and diffusers formats
cache.py     `repae cache-latents`: sharded, resumable posterior moments of a frozen VAE for a dataset
latents.py   the training loop's data source for `latents.path=DIR` (`repae train-ldm`)
commands.py  the three commands' argparse wiring
"""
