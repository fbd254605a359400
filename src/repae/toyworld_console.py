"""What the console says about the toy world (stderr, rank 0): one line per part just built, with
its held-out result, the device and the time it took, or one line for a world loaded from its
cache. The numbers are those `report.json` keeps beside the cached files."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Sequence

from tqdm.auto import tqdm

from repae import dist


def _trained(report: dict, part: str) -> str:
    seconds, device = report.get(f"{part}_train_seconds"), report.get(f"{part}_build_device")
    return f"trained in {seconds} s" + (f" on {device}" if device else "") if seconds is not None else "trained"


def _colour(stats: dict) -> str:
    from repae.toyworld import colours_are_faithful

    worst_mean = max(abs(e) for e in stats["channel_mean_rel_err"])
    worst_std = max(abs(e) for e in stats["channel_std_rel_err"])
    verdict = "true colour" if colours_are_faithful(stats) else "colours off"
    return (f"{verdict}: R,G,B means within {100 * worst_mean:.1f}% and stds within {100 * worst_std:.1f}% "
            f"of the data's, per-pixel R,G,B spread {stats['recon_rgb_spread']:.1f} "
            f"(data {stats['data_rgb_spread']:.1f})")


def built_lines(report: dict, parts: Sequence[str]) -> List[str]:
    """One line per built part: "teacher", "vae", "evaluator"."""
    lines = []
    for part in parts:
        if part == "vae":
            colour = f"; {_colour(report['vae_colour'])}" if "vae_colour" in report else ""
            lines.append(f"toy world: VAE {report['vae_heldout_psnr_db']:.1f} dB held-out PSNR{colour}; "
                         f"{_trained(report, part)}")
        else:
            accuracy = report[f"{part}_heldout_accuracy"]
            layout = (f", layout IoU {report[f'{part}_heldout_layout_iou']:.2f}"
                      if f"{part}_heldout_layout_iou" in report else "")
            scene = (f", scene factors R^2 {report[f'{part}_heldout_factor_r2']:.2f}"
                     if f"{part}_heldout_factor_r2" in report else "")
            lines.append(f"toy world: {part} {100 * accuracy:.1f}% held-out accuracy{layout}{scene}; "
                         f"{_trained(report, part)}")
    return lines


def cached_line(cache: Path, report: dict, arch: str) -> str:
    """The world as it was built before (the VAE of this architecture)."""
    parts = []
    if "teacher_heldout_accuracy" in report:
        parts.append(f"teacher {100 * report['teacher_heldout_accuracy']:.1f}%")
    psnr = report.get(f"vae_{arch}_heldout_psnr_db", report.get("vae_heldout_psnr_db"))
    if psnr is not None:
        parts.append(f"VAE {psnr:.1f} dB")
    if "evaluator_heldout_accuracy" in report:
        parts.append(f"evaluator {100 * report['evaluator_heldout_accuracy']:.1f}%")
    return f"toy world: cached in {cache} ({', '.join(parts)} held-out; report.json there)"


def say(lines: Sequence[str]) -> None:
    if dist.is_main():
        for line in lines:
            tqdm.write(line, file=sys.stderr)
