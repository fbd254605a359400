"""`repae bench reproduce`: the paper's five claims tested on the toy world (issue 8).

arms.py    which runs, as config overrides on one preset, and which claim each serves
measure.py the metrics of one checkpoint (toy FID, class accuracy, latent structure, CKNNA, PSNR)
runner.py  runs the arms (in parallel processes), measures every checkpoint, collects results
report.py  verdicts per claim, tables beside the paper's numbers, plots, REPRODUCTION.md
"""
