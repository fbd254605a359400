"""`repae bench reproduce`: the paper's five claims, (c) also without CFG, and REPA's premise (f)
tested on the toy world, or on a user's data and local weights (issues 8 and 21).

arms.py    which runs, as config overrides on one preset, and which claim each serves
judges.py  what every measurement compares against: the toy world's evaluator and teacher, or
           Inception and the run's alignment encoder on held-out real images
measure.py the metrics of one checkpoint (FID and class accuracy with and without CFG, latent
           structure, CKNNA, PSNR)
runner.py  runs the arms (in parallel processes), measures every checkpoint, collects results
report.py  verdicts per claim, tables beside the paper's numbers, plots, REPRODUCTION.md
"""
