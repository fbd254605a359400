"""What a run leaves for people: metrics.jsonl, a loss-curve plot, and a summary.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

from repae.fileio import write_atomic


class MetricsLog:
    """Append-only JSONL of logged records, one per logged step. On resume the log is rewritten
    (atomically) to the records up to the resumed step, each step once: later records came from
    steps the checkpoint does not contain and will be logged again, and a line torn by a crash
    mid-write is dropped and reported."""

    def __init__(self, path: Path, resumed_step: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rewind(resumed_step)

    def rewind(self, step: int) -> None:
        """Keep the records up to `step` (none for 0), one per step, rewriting the file atomically."""
        by_step: Dict[int, dict] = {}
        if step:
            for record in self.read(report=True):
                if isinstance(record.get("step"), int) and record["step"] <= step:
                    by_step[record["step"]] = record  # a step logged twice: its last record wins
        write_atomic(self.path, "".join(json.dumps(by_step[k]) + "\n" for k in sorted(by_step)).encode())

    def read(self, report: bool = False) -> List[dict]:
        """The records; unreadable lines (a torn last line) are skipped, and with `report` named on stderr."""
        if not self.path.is_file():
            return []
        records = []
        for number, line in enumerate(self.path.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not an object")
                records.append(record)
            except (ValueError, RecursionError):  # json.loads raises RecursionError on deeply nested input
                if report:
                    print(f"{self.path}: dropped unreadable line {number} ({line[:40]!r}...; torn by a crash?)",
                          file=sys.stderr)
        return records

    def __call__(self, record: dict) -> None:
        with self.path.open("a") as f:  # one write per record: a crash can tear only the last line
            f.write(json.dumps(record) + "\n")


class _TensorBoard:
    def __init__(self, writer):
        self.writer = writer

    def __call__(self, record: dict) -> None:
        for key, value in record.items():
            if key != "step":
                self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()


def extra_sinks(names: List[str], run_dir: Path, config: dict) -> List:
    """Callables record -> None for TensorBoard / Weights & Biases; a clear error when not installed."""
    sinks = []
    for name in names:
        if name == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError("train.log_to has tensorboard: pip install tensorboard") from None
            sinks.append(_TensorBoard(SummaryWriter(str(Path(run_dir) / "tensorboard"))))
        elif name == "wandb":
            try:
                import wandb
            except ImportError:
                raise ImportError("train.log_to has wandb: pip install wandb") from None
            wandb.init(project="repae", name=Path(run_dir).name, config=config, dir=str(run_dir), resume="allow")
            sinks.append(lambda r: wandb.log({k: v for k, v in r.items() if k != "step"}, step=r["step"]))
        else:
            raise ValueError(f"train.log_to: unknown sink {name!r}; use tensorboard or wandb")
    return sinks


def plot_losses(records: List[dict], path: Path) -> Path:
    """One panel per loss family over steps (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: Dict[str, List[str]] = {
        "diffusion loss": ["diffusion"],
        "REPA alignment (-cos)": ["repa_sit", "repa_vae"],
        "VAE regulariser": ["reg_rec", "reg_kl", "reg_gan", "reg_total"],
        "discriminator": ["disc", "logits_real", "logits_fake"],
    }
    panels = {t: [k for k in keys if any(k in r for r in records)] for t, keys in panels.items()}
    panels = {t: keys for t, keys in panels.items() if keys}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels.items()):
        for key in keys:
            pts = [(r["step"], r[key]) for r in records if key in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# The README's default run (`repae train` on toy world v8 with the VAE at the SiT's lr, 1000 steps, at cf35802: on
# a CPU the VAE's GroupNorm in fp32 and its attention as the official code's products, the decoder's upsample in
# phases; measured there): what a user of the default command should expect to see. tests/test_run_story.py keeps
# these and the README equal.
DEFAULT_TOY_RUN = {"steps": 1000, "sample_class_accuracy": 0.917, "sample_toy_fid": 3.05, "vae_heldout_psnr_db": 30.3}
# where the run, its cache and its threads live, and how long it runs (run_story checks the budget itself);
# a looser twin, loop.RESUMABLE_TRAIN_KEYS, says what may change when a run resumes (sampling settings too)
_WHERE = ("output_dir", "exp_name", "toy.cache_dir", "train.num_threads", "train.max_steps")


def is_default_toy_run(cfg) -> bool:
    """Whether `cfg` (a RunConfig) is the toy preset's recipe, whatever its paths and step budget."""
    from repae.config import config_differences, load_config, to_dict

    return not config_differences(to_dict(cfg), to_dict(load_config("toy")), ignore=_WHERE)


# `repae evaluate cknna --ckpt RUN` with its defaults, on a run of the toy preset's SiT: what to compare a
# number with. Measured with the committed code on toy world v5 at step 1200, one seed each: the README's
# default run (REPA-E), and the same recipe on the frozen pre-trained VAE with and without the REPA loss
# (train.tune_vae=false latent_norm.mode=fixed [loss.proj_coeff=0]); commands in the README (Evaluation).
TOY_CKNNA_SETTINGS = {"data": "toy world held-out set", "encoder": "toy-teacher", "depth": 2, "t": 0.5, "topk": 10,
                      "seed": 0, "labels": "data", "num_images": 1000}
TOY_CKNNA = {"REPA-E (the default run)": 0.109, "REPA on the frozen VAE": 0.085,
             "vanilla SiT on the frozen VAE": 0.023}


def toy_cknna_comparison(cfg, settings: dict) -> Optional[str]:
    """One line of reference CKNNA values when `settings` (those `repae evaluate cknna` records, with
    num_images) are its defaults on the toy world and `cfg` (a RunConfig) has the toy preset's SiT;
    None otherwise (the references would mislead)."""
    from repae.config import config_differences, load_config, to_dict

    if any(settings.get(k) != v for k, v in TOY_CKNNA_SETTINGS.items()):
        return None
    if config_differences(to_dict(cfg)["model"], to_dict(load_config("toy"))["model"]):
        return None
    refs = "; ".join(f"{name} {value:.3f}" for name, value in TOY_CKNNA.items())
    return (f"compare (toy world v5, step 1200, these settings): {refs}. Higher: the SiT's block-2 tokens share "
            "more of the toy teacher's nearest-neighbour structure")


def run_story(summary: dict, run_dir: Path, default_toy_run: bool = False, vae_tuned: bool = True) -> List[str]:
    """The end of a run in a few lines for people (stderr): time and median speed, the toy metrics with
    what they mean and, for the default toy run at its default budget, the README's figures to compare
    with, and where the files are. `summary` is what `train` returns (and writes to summary.json);
    `vae_tuned`: train.tune_vae (a frozen VAE is not called tuned)."""
    minutes = summary["wall_seconds"] / 60
    speed = summary.get("images_per_s")  # None when no step was logged
    lines = [f"done: step {summary['steps']} ({summary['steps_this_invocation']} this time) in {minutes:.1f} min"
             + (f", median {speed:.1f} images/s" if speed is not None else "")
             + (f" in {summary['precision']}" if summary.get("precision") else "")]
    toy = summary.get("toy") or {}
    expected = default_toy_run and summary["steps"] == DEFAULT_TOY_RUN["steps"]
    ref = DEFAULT_TOY_RUN if expected else {}
    if "sample_class_accuracy" in toy:
        said = f"; the README's default run: {100 * ref['sample_class_accuracy']:.1f}%" if ref else ""
        lines.append(f"  samples: the toy evaluator recognises the intended class in "
                     f"{100 * toy['sample_class_accuracy']:.1f}% of {toy['samples_scored']} (chance 10%{said})")
        said = f"; the README's default run: {ref['sample_toy_fid']}" if ref else ""
        lines.append(f"  samples: toy FID {toy['sample_toy_fid']} against the held-out images (lower is better{said})")
    if "vae_heldout_psnr_db" in toy and vae_tuned:
        said = f"; the README's default run: {ref['vae_heldout_psnr_db']} dB" if ref else ""
        lines.append(f"  tuned VAE: {toy['vae_heldout_psnr_db']:.1f} dB held-out PSNR (pre-trained: "
                     f"{toy['toy_vae_pretrained_psnr_db']:.1f} dB{said})")
    elif "vae_heldout_psnr_db" in toy:  # train.tune_vae=false: the pre-trained VAE, as it was
        lines.append(f"  frozen VAE: {toy['vae_heldout_psnr_db']:.1f} dB held-out PSNR")
    files = [name for name in ("summary.json", "metrics.jsonl", "loss_curves.png") if (run_dir / name).is_file()]
    lines.append(f"  files in {run_dir}: {', '.join(files)}, samples/ (last grid {Path(summary['samples']).name}), "
                 f"checkpoints/; run the same command to resume or continue")
    return lines
