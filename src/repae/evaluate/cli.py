"""`repae evaluate`: the metrics of the paper from the command line, each written as a JSON record.

    repae evaluate samples SOURCE --ref REF.npz [--inception PATH] [--no-pr] [--out R.json] [key=value ...]
    repae evaluate samples TOY_RUN [key=value ...]     (toy evaluator: toy FID, class accuracy)
    repae evaluate ref-stats SOURCE --out stats.npz [--inception PATH] [--image-size S] [--with-images]
    repae evaluate vae --vae PATH --data FOLDER|toy [--inception PATH] [--lpips-vgg F --lpips-heads F]
    repae evaluate latents [--vae PATH] --data FOLDER|toy [--ckpt RUN_OR_SIT] [--pca-figure out.png]
    repae evaluate spectrum [--vae toy|RUN|PATH ...] [--data FOLDER|toy] [--block 8] [--figure out.png]
    repae evaluate cknna --ckpt RUN_OR_SIT [--vae PATH] [--data FOLDER|toy] [--encoder NAME] [--depth D] [--t 0.5]

`samples` and `ref-stats` and `vae` run under torchrun: each rank takes a contiguous block of
the indices (`repae.evaluate.sources.shard_range`), statistics are all-reduced, IS logits and
precision/recall features are gathered on rank 0, and only rank 0 writes. `latents`, `spectrum` and `cknna`
are small: under torchrun only rank 0 computes them. Every record holds the metric values, the
sha256 of every file read, the settings, versions, date and command line (`report.py`).

Without --out a record goes to RUN/eval/<command>-stepN.json (a run) or eval-<command>.json, unless that
file holds a record of other settings or files (e.g. `samples RUN` then `samples RUN sample.cfg_scale=1`):
then it is kept, and the new record goes beside it as <command>-stepN-HASH.json, HASH naming its settings
(the same settings again reuse that name). The path written is printed on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

from repae.cli import IMAGE_SIZE, NON_NEGATIVE, POSITIVE, Parser, SEED, bounded, device_arg, out_file
from repae.evaluate.errors import EvaluationError

# torch and the metric modules are imported inside the handlers: `repae --help` stays fast.


def autocast_dtype(precision: str, device="cpu"):
    from repae.nn_utils import autocast_dtype as dtype_of  # imports torch: only when a handler runs

    return dtype_of(precision, device)


def resolve_precision(precision: str, device) -> str:
    from repae.nn_utils import resolve_precision as resolve  # imports torch: only when a handler runs

    return resolve(precision, device)


PSNR_NOTE = ("mean over images of per-image PSNR = 10 log10(255^2 / MSE over C,H,W) of the reconstructions "
             "rounded to uint8 (float64; MSE floored at 1e-10*255^2); a toy run's summary.json "
             "vae_heldout_psnr_db is the same number for `--data toy` with all held-out images and the posterior mean")
DCT_BLOCK = bounded(2)  # a 1x1 block holds only its DC term: no frequency bands to tell apart
MAX_NAMED_SKIPS = 20  # unreadable file names a result lists (all of them are counted)
SPLIT_NOTE = ("contiguous blocks of whole batches: of the B = ceil(N / batch_size) batches, rank r takes "
              "batches [r*q + min(r, m), ...), q, m = divmod(B, world)")


# ----------------------------------------------------------------------------- shared plumbing


def load_inception(path: Optional[str], device):
    """The FID Inception network (a module-level name, so tests can substitute a small one)."""
    from repae.evaluate.loading import load_inception as load

    return load(path, device)


def _device(name: str, distributed: bool):
    """Join torchrun's process group (distributed commands) and pick this rank's device."""
    from repae import dist

    return dist.init_from_env(name) if distributed else dist.device_named(name)


def _skipped(source) -> Dict[str, object]:
    """Unreadable images skipped, counted over all ranks (names: this rank's first few)."""
    from repae import dist
    from repae.evaluate.pipeline import sum_over_ranks

    names = list(getattr(source, "skipped", []))
    total = int(sum_over_ranks({"n": len(names)})["n"]) if dist.is_distributed() else len(names)
    return {"unreadable_images_skipped": total, "unreadable_examples": names[:MAX_NAMED_SKIPS]}


def _finish(args, kind: str, metrics: dict, settings: dict, files: Dict[str, Optional[str]], out: Path,
            device, notes: Optional[dict] = None) -> dict:
    """Hash the files, write the record atomically, print it (JSON on stdout) and the path written (stderr).
    Under a default name (no --out) it never replaces the record of another measurement
    (`repae.evaluate.report.record_path`): then it goes beside it, named by its settings."""
    from repae import dist
    from repae.evaluate.report import describe_files, environment, make_record, record_path, write_json_atomic

    argv = getattr(args, "argv", None)
    env = environment(["repae", *(sys.argv[1:] if argv is None else argv)], str(device), dist.world_size())
    record = make_record(kind, metrics, settings, describe_files(files), env, notes)
    if not getattr(args, "out", None):
        default = out
        out, why = record_path(default, record)
        if why:
            print(f"{why}: this one goes beside it, named by its settings", file=sys.stderr)
    write_json_atomic(out, record)
    print(json.dumps(record, indent=2))
    skipped = metrics.get("unreadable_images_skipped")
    if skipped:  # the JSON holds them; a measurement of fewer images than asked is said where people look
        print(f"skipped {skipped} unreadable images (unreadable_examples in the record), e.g. "
              f"{', '.join(map(str, metrics.get('unreadable_examples', [])[:5]))}", file=sys.stderr)
    print(f"wrote {out}", file=sys.stderr)
    return record


def _default_out(args, name: str, run_dir: Optional[Path] = None, step: Optional[int] = None) -> Path:
    if args.out:
        return Path(args.out)
    if run_dir is not None:
        return run_dir / "eval" / (f"{name}-step{step:07d}.json" if step is not None else f"{name}.json")
    return Path(f"eval-{name}.json")


def _only_rank0() -> bool:
    """For the small evaluations: True on every rank but rank 0 of a torchrun launch (they stop)."""
    return int(os.environ.get("RANK", "0")) != 0


# ----------------------------------------------------------------------------- samples


def _sample_source(args, device, kind: str, loaded):
    """(source, settings, files) for SOURCE: folder, .npz, or the loaded checkpoint to sample from."""
    import torch

    from repae import dist
    from repae.evaluate.sources import SampledImages, class_labels, open_folder, open_npz

    rank, world = dist.rank(), dist.world_size()
    if kind == "npz":
        source = open_npz(args.source, args.batch_size, rank, world, args.num_images, args.max_image_pixels)
        return source, {"source": {"kind": "npz", "path": args.source}}, {"samples_npz": args.source}
    if kind == "folder":
        source = open_folder(args.source, args.batch_size, None, rank, world, args.num_images,
                             workers=args.workers, max_pixels=args.max_image_pixels)
        return source, {"source": {"kind": "folder", "path": args.source}}, {}
    cfg, sit, vae = loaded.cfg, loaded.sit.to(device), loaded.vae.to(device)
    n = cfg.eval.num_samples if args.num_images is None else args.num_images  # checked >= 1 in cmd_samples
    labels = class_labels(n, sit.num_classes, cfg.eval.label_sampling, cfg.sample.seed)
    s = cfg.sample
    sampler = {"mode": s.mode, "num_steps": s.num_steps, "heun": s.heun, "heun_cfg_at": s.heun_cfg_at,
               "cfg_scale": s.cfg_scale,
               "guidance_low": s.guidance_low, "guidance_high": s.guidance_high, "seed": s.seed,
               "path_type": cfg.flow.path_type, "use_ema": s.use_ema, "batch_size": s.batch_size,
               "precision": resolve_precision(cfg.train.precision, device)}
    counts = torch.bincount(labels, minlength=sit.num_classes)
    label_info = {"sampling": cfg.eval.label_sampling, "num_classes": sit.num_classes,
                  "seed": s.seed if cfg.eval.label_sampling == "uniform" else None,
                  "min_per_class": int(counts.min()), "max_per_class": int(counts.max())}
    source = SampledImages(sit, vae, labels, sampler, s.batch_size, rank, world,
                           autocast_dtype(cfg.train.precision, device))
    settings = {"source": {"kind": "checkpoint", "path": args.source, "step": loaded.step},
                "num_samples": n, "sampler": sampler, "labels": label_info, "image_size": cfg.data.image_size}
    return source, settings, dict(loaded.files)


def _toy_judge(cfg, device):
    """(toy evaluator, held-out images, its files) of a toy run's world (built once and cached)."""
    from repae.evaluate.loading import toy_world
    from repae.toyworld import EVALUATOR_FILE, ensure_toy_evaluator

    world = toy_world(cfg)
    evaluator = ensure_toy_evaluator(world, cfg.toy, device=cfg.train.device).to(device).eval()
    return evaluator, world.heldout_images, {"toy_evaluator": str(world.cache_dir / EVALUATOR_FILE)}


def _toy_scores(source, local, evaluator, heldout) -> Optional[dict]:
    """Toy FID and class accuracy of every rank's samples (`local`: this rank's uint8 [n,3,H,W]), on rank 0."""
    import torch

    from repae.evaluate.pipeline import gather_rows
    from repae.evaluate.toy import score_samples

    images = gather_rows(local.numpy())
    if images is None:
        return None
    scores = score_samples(evaluator, torch.from_numpy(images), source.labels, heldout)
    return {"toy_fid": scores["sample_toy_fid"], "class_accuracy": scores["sample_class_accuracy"],
            "toy_num_images": scores["samples_scored"], "toy_reference_images": len(heldout)}


def _toy_inception_reference(heldout, inception, with_pr: bool, batch_size: int, device, autocast, progress):
    """Inception statistics (and pool features) of the toy world's held-out set: the reference when
    a toy run is scored by Inception without --ref."""
    from repae.evaluate.fid import Reference, extract_features

    batches = [heldout[i:i + batch_size] for i in range(0, len(heldout), batch_size)]
    got = extract_features(batches, inception, keep_pool=with_pr, device=device, autocast=autocast,
                           progress=progress, desc="reference: inception")
    return Reference(pool=got.pool.mean_cov(), spatial=got.spatial.mean_cov(), pool_feats=got.pool_feats,
                     source="toy world held-out set")


def cmd_samples(args) -> int:
    """FID family of samples (Inception judge); on a toy run also, or without --ref and Inception
    instead, toy FID and class accuracy from the toy evaluator (`repae.evaluate.toy`)."""
    import torch

    from repae import dist
    from repae.evaluate.loading import check_reference, inception_path, load_sit_and_vae, read_reference
    from repae.evaluate.pipeline import fid_family, on_main, progress_bar
    from repae.evaluate.sources import TensorImages, source_kind
    from repae.evaluate.toy import INCEPTION_JUDGE, TOY_JUDGE

    device = _device(args.device, distributed=True)
    kind = source_kind(args.source)
    loaded = None
    if kind == "checkpoint":
        loaded = load_sit_and_vae(args.source, args.vae, args.preset, args.config, args.overrides)
        if args.num_images is None and loaded.cfg.eval.num_samples == 0:  # a run's "no end-of-run evaluation"
            raise EvaluationError("eval.num_samples=0 draws no samples to evaluate: pass --num-images N "
                                  "(or eval.num_samples=N)")
    elif args.overrides or args.config:
        raise EvaluationError("key=value overrides and --config only apply when SOURCE is a checkpoint to sample "
                              f"from; {args.source} is {'a folder' if kind == 'folder' else 'an .npz'}")
    cfg = loaded.cfg if loaded else None
    toy = cfg is not None and cfg.data.source == "toy"
    ref = args.ref or (cfg.eval.ref_batch if cfg else None)  # a run's config may name them
    inc_path = inception_path(args.inception, cfg)
    # a toy run needs neither: Inception joins the toy judge when asked for or its file is there
    use_inception = not toy or bool(ref or args.inception) or bool(inc_path and Path(inc_path).is_file())
    if ref or not toy:
        check_reference(ref, need_images=not args.no_pr)
    source, settings, files = _sample_source(args, device, kind, loaded)  # checks the source's files
    progress = not args.no_progress
    metrics, judges, heldout = {}, [], None
    if toy:
        evaluator, heldout, toy_files = _toy_judge(cfg, device)
        drawn = [b.cpu() for b in progress_bar(source, "samples: sampling", progress)]
        local = torch.cat(drawn) if drawn else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
        metrics.update(_toy_scores(source, local, evaluator, heldout) or {})
        files.update(toy_files)
        judges.append(TOY_JUDGE)
        source = TensorImages(local, None, args.batch_size)  # the same samples for Inception
    if use_inception:
        inception = load_inception(inc_path, device)
        autocast = autocast_dtype(args.precision)
        reference = on_main(lambda: read_reference(ref, inception, not args.no_pr, args.batch_size, device, autocast,
                                                   progress) if ref else
                            _toy_inception_reference(heldout, inception, not args.no_pr, args.batch_size, device,
                                                     autocast, progress))
        sampled = kind == "checkpoint" and not toy  # then this pass draws the samples as it goes
        metrics.update(fid_family(source, inception, reference, with_precision_recall=not args.no_pr, device=device,
                                  autocast=autocast, progress=progress,
                                  desc="samples: sampling + inception" if sampled else "samples: inception") or {})
        judges.append(INCEPTION_JUDGE)
        settings.update(reference=ref or "toy world held-out set", precision_recall=not args.no_pr,
                        inception_precision=args.precision, inception_batch_size=args.batch_size,
                        is_split_size=5000, pr_k=3, pr_fp16_distances=True)
        files.update(inception=inc_path, reference=ref)
    skipped = _skipped(source)
    if not dist.is_main():
        return 0
    metrics.update(skipped)
    settings.update(judges=judges, distributed_split=SPLIT_NOTE)
    print(f"judged by: {', '.join(judges)}", file=sys.stderr)
    out = _default_out(args, "samples", loaded.run_dir if loaded else None, loaded.step if loaded else None)
    _finish(args, "samples", metrics, settings, files, out, device, notes=_samples_notes(judges))
    return 0


def _samples_notes(judges) -> dict:
    from repae.evaluate.toy import TOY_JUDGE

    notes = {"judges": judges}
    if TOY_JUDGE in judges:
        notes["toy_definitions"] = ("toy FID: Frechet distance of the toy evaluator's mean-pooled tokens, samples "
                                    "against the toy world's held-out set; class accuracy: the evaluator's argmax "
                                    "against the class each sample was generated for (repae.evaluate.toy)")
    if "Inception" in judges:
        notes["definitions"] = ("ADM evaluator: FID pool_3, sFID mixed_6/conv[:7], IS splits of 5000, "
                                "precision/recall k=3")
    return notes


# ----------------------------------------------------------------------------- ref-stats


def cmd_ref_stats(args) -> int:
    from repae import dist
    from repae.evaluate.loading import inception_path, save_npz_atomic
    from repae.evaluate.pipeline import reference_statistics
    from repae.data.sources import detect_kind
    from repae.evaluate.sources import open_folder, open_npz, source_kind

    device = _device(args.device, distributed=True)
    data_kind = detect_kind(args.source)  # parquet/arrow, tar shards and prepare-data stores, as training reads them
    kind = data_kind if data_kind != "folder" else source_kind(
        args.source, "image source", "parquet/arrow files, tar shards or a prepare-data store")
    rank, world = dist.rank(), dist.world_size()
    if kind in ("hf", "wds", "packed"):
        from repae.evaluate.loading import open_records

        source = open_records(kind, args.source, args.image_size, args.batch_size, args.num_images,
                              args.max_image_pixels, args.split, rank, world).source
    elif kind == "checkpoint":
        raise EvaluationError(f"ref-stats reads images (a folder or an .npz), not a checkpoint: {args.source}")
    elif kind == "npz":
        if args.image_size:
            raise EvaluationError("--image-size (ADM centre crop) applies to image folders, not to an .npz")
        source = open_npz(args.source, args.batch_size, rank, world, args.num_images, args.max_image_pixels)
    else:
        source = open_folder(args.source, args.batch_size, args.image_size, rank, world, args.num_images,
                             workers=args.workers, max_pixels=args.max_image_pixels)
    inc_path = inception_path(args.inception)
    inception = load_inception(inc_path, device)
    got = reference_statistics(source, inception, keep_images=args.with_images, device=device,
                               autocast=autocast_dtype(args.precision), progress=not args.no_progress)
    skipped = _skipped(source)
    if not dist.is_main():
        return 0
    pool, spatial, images, n = got
    arrays = {"mu": pool.mu, "sigma": pool.sigma, "mu_s": spatial.mu, "sigma_s": spatial.sigma}
    if args.with_images:
        arrays = {"arr_0": images, **arrays}
    out = save_npz_atomic(args.out, **arrays)
    settings = {"source": {"kind": kind, "path": args.source, **({"split": args.split} if kind == "hf" else {})},
                "image_size": args.image_size,
                "crop": "ADM centre crop" if args.image_size else None, "with_images": args.with_images,
                "inception_precision": args.precision, "distributed_split": SPLIT_NOTE}
    metrics = {"num_images": n, "stats_file": str(out), "keys": sorted(arrays), **skipped}
    _finish(args, "ref-stats", metrics, settings, {"inception": inc_path, "stats": str(out)},
            Path(args.json) if args.json else out.with_suffix(".json"), device)
    return 0


# ----------------------------------------------------------------------------- vae


def _lpips(args, device):
    if not (args.lpips_vgg or args.lpips_heads):
        return None
    if not (args.lpips_vgg and args.lpips_heads):
        raise EvaluationError("LPIPS needs both --lpips-vgg (vgg16-397923af.pth) and --lpips-heads (LPIPS v0.1 vgg.pth)")
    from repae.models.lpips import LPIPS, LPIPSWeightsError

    try:
        return LPIPS.from_files(args.lpips_vgg, args.lpips_heads).to(device)
    except LPIPSWeightsError as err:
        raise EvaluationError(str(err)) from None


def _models(args):
    """(vae, its files, the run or None) from --vae / --ckpt: a run directory gives its tuned VAE
    (and, for `latents`, its SiT's BatchNorm); with neither and --data toy, the toy world's VAE.
    The run is the one --ckpt names when it names one, else the one --vae names."""
    from repae.evaluate.loading import load_run, load_vae_file
    from repae.evaluate.sources import check_dir_role, is_run_or_checkpoint_dir
    from repae.hub import is_hub_id

    ckpt = getattr(args, "ckpt", None)
    if ckpt:
        check_dir_role(ckpt, "sit or run")  # before any VAE or toy world is loaded
    run = load_run(ckpt) if ckpt and is_run_or_checkpoint_dir(ckpt) else None
    if args.vae and is_run_or_checkpoint_dir(args.vae):
        vae_run = load_run(args.vae)
        return vae_run.vae, {"vae": vae_run.files["vae"]}, run or vae_run
    if args.vae:
        if not is_hub_id(args.vae) and not Path(args.vae).exists():
            raise EvaluationError(f"VAE not found: {args.vae}")
        vae, files = load_vae_file(args.vae)
        return vae, files, run
    if run is not None:
        return run.vae, {"vae": run.files["vae"]}, run
    if args.data == "toy":
        from repae.evaluate.loading import toy_world
        from repae.weights import load_model

        tw = toy_world(_data_cfg(args, None))
        return load_model(tw.vae_path, kind="vae").eval(), {"vae": str(tw.vae_path)}, None
    raise EvaluationError("--vae is required: a VAE weight file, a diffusers directory, or a training run")


def _data_cfg(args, run):
    """The config that says what `--data toy` is: the run's, else --preset/--config/overrides."""
    from repae.evaluate.loading import load_cfg

    if run is not None:
        if args.config or args.overrides:
            raise EvaluationError("--config and key=value overrides describe the toy world when no training run "
                                  "is given; a run brings its own config")
        return run.cfg
    return load_cfg(args.preset, args.config, args.overrides) if args.data == "toy" else None


def cmd_vae(args) -> int:
    from repae import dist
    from repae.evaluate.loading import inception_path, open_data
    from repae.evaluate.pipeline import vae_metrics

    device = _device(args.device, distributed=True)
    vae, files, run = _models(args)
    vae = vae.to(device).eval()
    inc_path = inception_path(args.inception) if args.inception else None
    inception = load_inception(inc_path, device) if args.inception else None
    lpips = _lpips(args, device)
    data = open_data(args.data, _data_cfg(args, run), image_size=args.image_size, batch_size=args.batch_size,
                     limit=args.num_images, workers=args.workers, max_pixels=args.max_image_pixels,
                     split=args.split)
    metrics = vae_metrics(vae, data.source, inception=inception, lpips=lpips, use_mean=not args.sample_posterior,
                          amp_dtype=autocast_dtype(args.precision), inception_autocast=autocast_dtype(args.precision),
                          progress=not args.no_progress)
    skipped = _skipped(data.source)
    if not dist.is_main():
        return 0
    metrics.update(skipped)
    settings = {**{k: v for k, v in data.info.items() if k != "labelled"}, "latent": "posterior sample"
                if args.sample_posterior else "posterior mean", "precision": args.precision,
                "batch_size": args.batch_size, "psnr_cap_db": 100.0, "distributed_split": SPLIT_NOTE}
    files = {**files, **data.files, "inception": inc_path, "lpips_vgg": args.lpips_vgg,
             "lpips_heads": args.lpips_heads}
    _finish(args, "vae", metrics, settings, files, _default_out(args, "vae", *_run_place(run)), device,
            notes={"rfid": "Fréchet distance of Inception pool_3 statistics, reconstructions vs the originals "
                           "of the same images" if inception is not None else "not computed (no --inception)",
                   "psnr": PSNR_NOTE})
    return 0


# ----------------------------------------------------------------------------- latents


def _run_place(run):
    return (run.run_dir, run.step) if run is not None else (None, None)


def _latent_norm(args, run):
    """(BatchNorm, files) of the SiT in --ckpt (a run or a SiT file), or (None, {})."""
    from repae.evaluate.sources import check_dir_role, is_run_or_checkpoint_dir

    if not args.ckpt:
        return None, {}
    check_dir_role(args.ckpt, "sit or run")
    if is_run_or_checkpoint_dir(args.ckpt):  # then `run` is the one --ckpt names (see _models)
        return run.sit.bn, {"sit": run.files["sit"]}
    from repae.hub import is_hub_id
    from repae.weights import load_model

    if not is_hub_id(args.ckpt) and not Path(args.ckpt).exists():
        raise EvaluationError(f"checkpoint not found: {args.ckpt}")
    sit = load_model(args.ckpt, kind="sit")
    if sit.bn is None:
        raise EvaluationError(f"{args.ckpt}: this SiT has no latent BatchNorm to normalise with")
    return sit.bn, {"sit": args.ckpt}


def _pca_figure(args, vae, data, device) -> Optional[str]:
    """The PCA-to-RGB figure of the first --pca-images images (a second row per --compare-vae)."""
    if not args.pca_figure:
        return None
    from repae.evaluate.latents import posterior_means, save_latent_pca_figure
    from repae.evaluate.loading import first_images, load_vae_file

    images, _ = first_images(data.source, args.pca_images)
    vaes = [vae] + ([load_vae_file(args.compare_vae)[0].to(device).eval()] if args.compare_vae else [])
    sets = [posterior_means(v, images) for v in vaes]
    return str(save_latent_pca_figure(args.pca_figure, images, sets, upscale=max(1, 128 // images.shape[-1])))


def cmd_latents(args) -> int:
    if _only_rank0():
        return 0
    from repae.evaluate.latents import measure_latent_structure
    from repae.evaluate.loading import open_data
    from repae.evaluate.pipeline import progress_bar

    device = _device(args.device, distributed=False)
    vae, files, run = _models(args)
    vae = vae.to(device).eval()
    bn, bn_files = _latent_norm(args, run)
    bn = bn.to(device) if bn is not None else None
    data = open_data(args.data, _data_cfg(args, run), image_size=args.image_size, batch_size=args.batch_size,
                     limit=args.num_images, workers=args.workers, max_pixels=args.max_image_pixels,
                     split=args.split)
    batches = progress_bar(data.source, "latents", not args.no_progress)
    metrics = measure_latent_structure(vae, batches, latent_norm=bn, use_mean=not args.sample_posterior)
    metrics.update(_skipped(data.source))
    metrics["pca_figure"] = _pca_figure(args, vae, data, device)
    settings = {**{k: v for k, v in data.info.items() if k != "labelled"},
                "latent": "posterior sample" if args.sample_posterior else "posterior mean",
                "normalized_with": "latent BatchNorm running statistics of --ckpt" if bn is not None else None,
                "pca_images": args.pca_images if args.pca_figure else None}
    files = {**files, **{"bn_" + k: v for k, v in bn_files.items()}, **data.files, "compare_vae": args.compare_vae}
    _finish(args, "latents", metrics, settings, files, _default_out(args, "latents", *_run_place(run)), device,
            notes={"raw": "statistics of the VAE's latents as they are",
                   "normalized": "statistics after the SiT's latent BatchNorm (z - mean) / sqrt(var + eps)",
                   "spatial_variance": "per channel, population variance over the H*W positions; mean over "
                                       "channels and images",
                   "total_variation": "anisotropic L1 over adjacent positions, summed over channels; mean over images"})
    return 0


# ----------------------------------------------------------------------------- spectrum


def _one_spectrum_vae(path: str, toy_cfg):
    """(VAE, latent normaliser or (mean, var) or None, files, run or None) for one --vae value:
    'toy' (the toy world's pre-trained VAE and its latent statistics), a training run or checkpoint
    (its tuned VAE; the SiT's latent BatchNorm), an `export-vae` directory (latent_stats.safetensors
    beside the VAE), or a VAE weight file / diffusers directory (raw latents only)."""
    from repae.evaluate.loading import load_run, toy_world
    from repae.evaluate.sources import check_dir_role, is_run_or_checkpoint_dir
    from repae.stage2.latents import vae_files
    from repae.weights import load_latent_stats, load_model

    if path == "toy":
        tw = toy_world(toy_cfg())
        vae = load_model(tw.vae_path, kind="vae")
        return (vae, load_latent_stats(tw.latent_stats_path, channels=vae.args.z_channels),
                {"vae": str(tw.vae_path), "latent_stats": str(tw.latent_stats_path)}, None)
    if is_run_or_checkpoint_dir(path):
        run = load_run(path)
        return run.vae, run.sit.bn, {"vae": run.files["vae"], "sit": run.files["sit"]}, run
    check_dir_role(path, "vae or run", missing="VAE")
    load_path, _, stats = vae_files(path)
    vae = load_model(load_path, kind="vae")
    norm = load_latent_stats(stats, channels=vae.args.z_channels) if stats else None
    return vae, norm, {"vae": str(load_path), "latent_stats": stats}, None


def _spectrum_vaes(args):
    """([(label, vae, norm, files)] in --vae order, the first training run among them or None)."""
    from repae.evaluate.loading import load_cfg

    if not args.vae and args.data != "toy":
        raise EvaluationError("--vae is required (or --data toy, whose VAE is the default): a run, an export-vae "
                              "directory, a VAE weight file or diffusers directory, or 'toy'")
    paths = args.vae or ["toy"]
    labels = args.label or paths
    if len(labels) != len(paths):
        raise EvaluationError(f"{len(labels)} --label for {len(paths)} --vae: give one label per VAE, or none")
    if len(set(labels)) != len(labels):
        raise EvaluationError(f"labels must differ: {labels}")
    loaded, run = [None] * len(paths), None
    for i in sorted(range(len(paths)), key=lambda i: paths[i] == "toy"):  # runs first: they describe the toy world
        toy_cfg = (lambda: run.cfg) if run is not None else (lambda: load_cfg(args.preset, args.config, args.overrides))
        vae, norm, files, vae_run = _one_spectrum_vae(paths[i], toy_cfg)
        run = run or vae_run
        loaded[i] = (labels[i], vae, norm, files)
    return loaded, run


def _check_blocks(args, images, vaes) -> None:
    """EvaluationError, before any VAE runs, when a DCT block is larger than what it tiles."""
    side = min(images.shape[-2:])
    image_block = args.block if args.image_block is None else args.image_block
    if image_block > side:
        raise EvaluationError(f"the images are {side} px on their short side: a {image_block}x{image_block} DCT "
                              f"block does not fit (--image-block, or --block)")
    for label, vae, _, _ in vaes:
        latent_side = side // vae.downsample_factor
        if args.block > latent_side:
            raise EvaluationError(f"{label}'s latents are {latent_side} positions on their short side: use "
                                  f"--block {latent_side} or less")


def cmd_spectrum(args) -> int:
    if _only_rank0():
        return 0
    import torch

    from repae.evaluate.loading import first_images, open_data
    from repae.evaluate.spectrum import latent_spectra, plot_spectra

    device = _device(args.device, distributed=False)
    vaes, run = _spectrum_vaes(args)
    data = open_data(args.data, _data_cfg(args, run), image_size=args.image_size, batch_size=args.batch_size,
                     limit=args.num_images, workers=args.workers, max_pixels=args.max_image_pixels,
                     split=args.split)
    progress = not args.no_progress
    images, _ = first_images(data.source, args.num_images, progress, desc="spectrum: read images")
    _check_blocks(args, images, vaes)
    dtype = autocast_dtype(args.precision)
    spectra, files = {}, {}
    for label, vae, norm, vae_files in vaes:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            got = latent_spectra(vae.to(device).eval(), images, norm, block=args.block, image_block=args.image_block,
                                 remove_mean=not args.keep_mean, use_mean=not args.sample_posterior,
                                 batch_size=args.batch_size, progress=progress, desc=f"spectrum: {label}")
        spectra.setdefault("images", got.pop("images"))
        spectra.update({f"{label}/{kind}": s for kind, s in got.items()})
        files.update({f"{label}/{role}": p for role, p in vae_files.items()})
    figure = str(plot_spectra(spectra, args.figure, block=args.block)) if args.figure else None
    metrics = {"num_images": len(images), "spectra": {k: s.to_dict() for k, s in spectra.items()},
               "figure": figure, **_skipped(data.source)}
    settings = {**{k: v for k, v in data.info.items() if k != "labelled"}, "vaes": [v[0] for v in vaes],
                "block": args.block, "image_block": args.block if args.image_block is None else args.image_block, "remove_mean": not args.keep_mean,
                "latent": "posterior sample" if args.sample_posterior else "posterior mean",
                "precision": args.precision, "images_range": "[-1,1] (the VAE's input)"}
    _finish(args, "spectrum", metrics, settings, {**files, **data.files},
            _default_out(args, "spectrum", *_run_place(run)), device,
            notes={"bands": "orthonormal 2D DCT-II of each block of each channel; band of coefficient (u,v) = u+v, "
                            "0 (DC) .. 2(block-1); fractions: energy per band over all blocks, channels and images, "
                            "normalised to sum 1",
                   "high_frequency_fraction": "fraction of all energy in bands u+v >= block",
                   "remove_mean": "each channel's per-image mean subtracted before the DCT (offsets are not "
                                  "spatial structure); H,W centre-cropped to multiples of the block",
                   "normalized": "latents through the run's SiT latent BatchNorm running statistics, or the "
                                 "latent statistics exported with the VAE (toy world / export-vae)"})
    return 0


# ----------------------------------------------------------------------------- cknna


def _encoder_name(args, cfg) -> str:
    """--encoder, else the run's first encoder; EvaluationError for neither, and for an --encoder-path the
    toy teacher cannot use (it is the toy world's own, not a file)."""
    name = args.encoder or (cfg.encoder.names[0] if cfg.encoder.names else None)
    if name is None:
        raise EvaluationError("--encoder NAME is required (e.g. dinov2-vit-b)")
    if name == "toy-teacher" and args.encoder_path:
        raise EvaluationError(f"--encoder-path {args.encoder_path}: the toy teacher is the toy world's own "
                              f"(its cache holds it); --encoder-path names a real encoder's weights (--encoder NAME)")
    return name


def _encoder(args, cfg, data, image_size: int, device):
    """(encoder module, name, files): --encoder (default: the run's first), toy-teacher from the toy world."""
    name = _encoder_name(args, cfg)
    if name == "toy-teacher":
        from repae.evaluate.loading import toy_world

        tw = data.toy or toy_world(cfg)
        return tw.teacher.to(device).eval(), name, {"encoder": str(tw.cache_dir / "teacher.safetensors")}
    from repae.models.encoders import load_encoder

    path = args.encoder_path
    if path is None and cfg.encoder.paths and name in cfg.encoder.names:
        path = cfg.encoder.paths[cfg.encoder.names.index(name)]
    try:
        enc = load_encoder(name, path, image_size)
    except KeyError as err:
        raise EvaluationError(str(err.args[0])) from None
    return enc.to(device).eval(), name, {"encoder": path}


def _cknna_inputs(loaded, encoder, images, device, batch_size: int, progress: bool = False):
    """(normalised clean latents [n,C,h,w], mean-pooled encoder features [n,D]) of the images."""
    import torch

    from repae.evaluate.pipeline import progress_bar
    from repae.pixels import to_vae_range

    latents, feats = [], []
    with torch.no_grad():
        for i in progress_bar(range(0, len(images), batch_size), "cknna: VAE + encoder", progress):
            x = images[i:i + batch_size].to(device)
            z = loaded.vae.encode(to_vae_range(x)).mode().float()
            latents.append((loaded.sit.bn.normalize(z) if loaded.sit.bn is not None else z).cpu())
            f = encoder(x).float()
            feats.append((f.mean(dim=1) if f.dim() == 3 else f).cpu())
    return torch.cat(latents), torch.cat(feats)


def cmd_cknna(args) -> int:
    if _only_rank0():
        return 0
    import torch

    from repae.evaluate.cknna import sit_encoder_alignment
    from repae.evaluate.loading import first_images, load_sit_and_vae, open_data

    if args.topk >= args.num_images:  # the mutual k-NN needs k neighbours besides each image itself
        raise EvaluationError(f"--topk {args.topk} must be below --num-images {args.num_images}")
    device = _device(args.device, distributed=False)
    loaded = load_sit_and_vae(args.ckpt, args.vae, args.preset, args.config, args.overrides)
    cfg, sit = loaded.cfg, loaded.sit.to(device).eval()
    loaded.vae.to(device).eval()
    image_size = sit.args.input_size * loaded.vae.downsample_factor
    depth = cfg.model.encoder_depth if args.depth is None else args.depth
    if not 1 <= depth <= len(sit.blocks):  # before the data is read and encoded
        raise EvaluationError(f"--depth {depth}: this SiT has blocks 1..{len(sit.blocks)}")
    _encoder_name(args, cfg)  # likewise
    if args.image_size and args.image_size != image_size:
        raise EvaluationError(f"this SiT/VAE pair takes {image_size}px images, not --image-size {args.image_size}")
    data = open_data(args.data, cfg, image_size=image_size, batch_size=args.batch_size, limit=args.num_images,
                     workers=args.workers, max_pixels=args.max_image_pixels, split=args.split)
    progress = not args.no_progress
    images, labels = first_images(data.source, args.num_images, progress, desc="cknna: read images")
    if images.shape[-1] != image_size:
        raise EvaluationError(f"the data's images are {images.shape[-1]}px; this SiT/VAE pair takes {image_size}px")
    if len(images) <= args.topk or len(images) < 4:  # CKNNA's mutual k-NN and unbiased HSIC
        raise EvaluationError(f"--topk {args.topk} needs more than {args.topk} images (and at least 4); "
                              f"the data gave {len(images)}")
    use_data_labels = args.labels == "data" or (args.labels == "auto" and data.has_labels)
    if use_data_labels and (not data.has_labels or int(labels.max()) >= sit.num_classes):
        raise EvaluationError("--labels data needs class labels below the SiT's num_classes "
                              f"({sit.num_classes}); use --labels null")
    y = labels if use_data_labels else torch.full_like(labels, sit.null_class)
    encoder, enc_name, enc_files = _encoder(args, cfg, data, image_size, device)
    latents, feats = _cknna_inputs(loaded, encoder, images, device, args.batch_size, progress)
    score = sit_encoder_alignment(sit, latents, y, feats, t=args.t, depth=depth, topk=args.topk,
                                  path_type=cfg.flow.path_type, seed=args.seed, batch_size=args.batch_size,
                                  progress=progress)
    metrics = {"cknna": score, "num_images": len(images), **_skipped(data.source)}
    settings = {**{k: v for k, v in data.info.items() if k != "labelled"}, "encoder": enc_name, "depth": depth,
                "t": args.t, "topk": args.topk, "seed": args.seed, "path_type": cfg.flow.path_type,
                "labels": "data" if use_data_labels else "null class", "checkpoint_step": loaded.step}
    files = {**loaded.files, **data.files, **enc_files}
    _finish(args, "cknna", metrics, settings, files, _default_out(args, "cknna", loaded.run_dir, loaded.step),
            device, notes={"protocol": "CKNNA (PRH, unbiased HSIC) between SiT tokens after block `depth` at noise "
                                       "level t (t=0 data, t=1 noise) and encoder patch tokens, both mean-pooled "
                                       "and L2-normalised; latents are posterior means through the latent BatchNorm"})
    from repae.train.report import toy_cknna_comparison  # the numbers a toy-world user should compare with

    comparison = toy_cknna_comparison(cfg, {**settings, "num_images": len(images)})
    if comparison:
        print(comparison, file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- argparse


def _guarded(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Errors a user can fix -> `repae evaluate: error: ...` on stderr and exit code 2."""
    def run(args: argparse.Namespace) -> int:
        from repae.config import ConfigError
        from repae.weights import CheckpointError

        try:
            return fn(args)
        except (EvaluationError, ConfigError, CheckpointError) as err:
            print(f"repae evaluate: error: {err}", file=sys.stderr)
            return 2
    return run


def _out_help(name: str) -> str:
    return (f"JSON result (default: RUN/eval/{name}-stepN.json for a run, else eval-{name}.json; when that file "
            f"holds a record of other settings, it is kept and this one is written beside it as "
            f"{name}-stepN-HASH.json, HASH naming its settings)")


def _common(p: argparse.ArgumentParser, out_help: str = "JSON result path", out_required: bool = False) -> None:
    p.add_argument("--out", help=out_help, required=out_required, type=out_file())
    p.add_argument("--batch-size", type=POSITIVE, default=64, help="images per batch (default 64)")
    p.add_argument("--device", default="auto", type=device_arg,
                   help="auto | cpu | cuda | cuda:N (under torchrun: this rank's GPU)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="Inception / VAE arithmetic (default fp32, as the published evaluators)")
    p.add_argument("--workers", type=NON_NEGATIVE, default=4, help="image decoding threads (default 4)")
    p.add_argument("--max-image-pixels", type=POSITIVE, default=64_000_000, metavar="N",
                   help="skip (and count) image files whose header claims more than N pixels, without decoding "
                        "them (default 64000000, as data.max_image_pixels)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="toy", help="preset for SiT weight files / --data toy (default: toy)")
    p.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML file(s) merged in order")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides on the run's (or preset's) config, e.g. sample.cfg_scale=1.8")


def _split_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", default="validation",
                   help="parquet/arrow data whose files are named by split: the split read (default validation)")


def _data_args(p: argparse.ArgumentParser, image_size: bool = True) -> None:
    p.add_argument("--data", help="image folder (class sub-folders give labels), parquet/arrow files or a hub "
                                  "dataset id, tar shards, a prepare-data store, or 'toy' (the toy world's "
                                  "held-out set; the default for a toy-world run)")
    _split_arg(p)
    if image_size:
        p.add_argument("--image-size", type=IMAGE_SIZE, default=256,
                       help="ADM centre crop size for folders (default 256)")
    p.add_argument("--sample-posterior", action="store_true", help="use a posterior sample, not its mean")


def _add_samples(sub) -> None:
    p = sub.add_parser("samples", help="FID, sFID, IS, precision/recall of samples against a reference batch",
                       description="SOURCE: a folder of images (recursive, sorted; any size), an .npz with arr_0 "
                                   "uint8 [N,H,W,3] (ADM / `repae sample --npz`), or a training run / SiT weight "
                                   "file to sample from (eval.num_samples samples, sample.* settings, labels "
                                   "eval.label_sampling=balanced (i % num_classes) | uniform).")
    p.add_argument("source", help="image folder, .npz, run directory or SiT weight file")
    p.add_argument("--ref", help="ADM reference batch .npz (arr_0 and/or mu, sigma, mu_s, sigma_s); "
                                 "default: the run's eval.ref_batch. A toy-world run needs none: it is judged "
                                 "by the toy evaluator (toy FID, class accuracy), and by Inception too against "
                                 "the toy held-out set when the Inception file is there")
    p.add_argument("--inception", help="pt_inception-2015-12-05-6726825d.pth (default: eval.inception_path, "
                                       "then $REPAE_WEIGHTS)")
    p.add_argument("--no-pr", action="store_true", help="skip precision/recall (then REF may hold statistics only)")
    p.add_argument("--vae", help="VAE for a SiT weight file (a run brings its own)")
    p.add_argument("--num-images", type=POSITIVE, help="evaluate the first N images / draw N samples "
                                                  "(default: all / eval.num_samples)")
    _common(p, _out_help("samples"))
    _config_args(p)
    p.set_defaults(func=_guarded(cmd_samples))


def _add_ref_stats(sub) -> None:
    p = sub.add_parser("ref-stats", help="reference statistics (ADM keys mu, sigma, mu_s, sigma_s) of images",
                       description="Writes --out (.npz with mu, sigma, mu_s, sigma_s; with --with-images also "
                                   "arr_0, so precision/recall can use it) and a JSON record beside it.")
    p.add_argument("source", help="image folder (recursive), .npz with arr_0, or parquet/arrow files (or a hub "
                                  "dataset id), tar shards or a prepare-data store (these need --image-size)")
    _split_arg(p)
    p.add_argument("--inception", help="pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--image-size", type=IMAGE_SIZE,
                   help="ADM centre crop of folder images to this size (default: as is)")
    p.add_argument("--with-images", action="store_true", help="also store the images as arr_0 (one size needed)")
    p.add_argument("--num-images", type=POSITIVE, help="only the first N images")
    p.add_argument("--json", type=out_file(), help="JSON record path (default: --out with .json)")
    _common(p, "statistics .npz to write", out_required=True)
    p.set_defaults(func=_guarded(cmd_ref_stats))


def _add_vae(sub) -> None:
    p = sub.add_parser("vae", help="rFID, PSNR, SSIM, LPIPS of a VAE's reconstructions, in one pass")
    p.add_argument("--vae", help="VAE weights, diffusers directory or training run (default with --data toy: "
                                 "the toy world's pre-trained VAE)")
    _data_args(p)
    p.add_argument("--num-images", type=POSITIVE, help="only the first N images")
    p.add_argument("--inception", help="Inception weights: adds rFID")
    p.add_argument("--lpips-vgg", help="torchvision vgg16-397923af.pth: with --lpips-heads adds LPIPS")
    p.add_argument("--lpips-heads", help="LPIPS v0.1 vgg.pth linear heads")
    _common(p, _out_help("vae"))
    _config_args(p)
    p.set_defaults(func=_guarded(cmd_vae))


def _add_latents(sub) -> None:
    p = sub.add_parser("latents", help="latent spatial variance and total variation (raw, and normalised by a "
                                       "SiT's latent BatchNorm), PCA-to-RGB figure")
    p.add_argument("--vae", help="VAE weights, diffusers directory or training run (default: the --ckpt run's)")
    p.add_argument("--ckpt", help="run or SiT weights whose latent BatchNorm normalises the latents")
    _data_args(p)
    p.add_argument("--num-images", type=POSITIVE, help="only the first N images")
    p.add_argument("--pca-figure", type=out_file("image"),
                   help="PNG: images, then latents' top-3 principal components as RGB")
    p.add_argument("--pca-images", type=POSITIVE, default=8, help="images in the figure (default 8)")
    p.add_argument("--compare-vae", help="a second VAE: one more PCA row (e.g. before E2E tuning)")
    _common(p, _out_help("latents"))
    _config_args(p)
    p.set_defaults(func=_guarded(cmd_latents))


def _add_cknna(sub) -> None:
    p = sub.add_parser("cknna", help="CKNNA alignment of SiT hidden states with a vision encoder's features")
    p.add_argument("--ckpt", required=True, help="training run or SiT weight file")
    p.add_argument("--vae", help="VAE for a SiT weight file (a run brings its own)")
    p.add_argument("--data", help="image folder, parquet/arrow, tar shards, a prepare-data store, or 'toy' "
                                  "(default for a toy-world run)")
    _split_arg(p)
    p.add_argument("--image-size", type=IMAGE_SIZE, help="checked against the SiT/VAE pair's image size")
    p.add_argument("--encoder", help="encoder name (default: the run's first; toy-teacher in the toy world)")
    p.add_argument("--encoder-path", help="the encoder's weight file (default: encoder.paths / $REPAE_WEIGHTS)")
    p.add_argument("--depth", type=POSITIVE, help="SiT block whose output is compared (default: model.encoder_depth)")
    p.add_argument("--t", type=bounded(0.0, 1.0, float), default=0.5,
                   help="noise level in [0, 1], t=0 data, t=1 noise (default 0.5)")
    p.add_argument("--topk", type=bounded(2), default=10,
                   help="k of the mutual nearest neighbours, below the image count (default 10)")
    p.add_argument("--num-images", type=bounded(4), default=1000, help="images used (default 1000)")
    p.add_argument("--labels", choices=["auto", "data", "null"], default="auto",
                   help="SiT class input: the data's labels or the null class (auto: data labels when known)")
    p.add_argument("--seed", type=SEED, default=0, help="noise seed (per image index)")
    _common(p, _out_help("cknna"))
    _config_args(p)
    p.set_defaults(func=_guarded(cmd_cknna))


def _add_spectrum(sub) -> None:
    p = sub.add_parser("spectrum", help="blockwise DCT energy per frequency band of latents (raw, normalised) "
                                        "and images; compares VAEs")
    p.add_argument("--vae", action="append", help="a VAE to analyse (repeat to compare): 'toy' (the toy world's "
                   "pre-trained VAE; the default with --data toy), a run (its tuned VAE, normalised by its SiT's "
                   "BatchNorm), an export-vae directory, a weight file or diffusers directory")
    p.add_argument("--label", action="append", help="a name per --vae, in order (default: the --vae value)")
    _data_args(p)
    p.add_argument("--num-images", type=POSITIVE, default=1000, help="images encoded (default 1000)")
    p.add_argument("--block", type=DCT_BLOCK, default=8, help="DCT block size for latents (default 8)")
    p.add_argument("--image-block", type=DCT_BLOCK, help="DCT block size for the images (default: --block)")
    p.add_argument("--keep-mean", action="store_true", help="keep each channel's per-image mean (in DC)")
    p.add_argument("--figure", type=out_file("figure"),
                   help="figure (.png, .pdf, .svg, ...): energy fraction per band (log) of every series")
    _common(p, _out_help("spectrum"))
    _config_args(p)
    p.set_defaults(func=_guarded(cmd_spectrum))


class _Parser(Parser):
    """Also takes key=value overrides after options (`samples RUN --ref R sample.cfg_scale=2`), which
    plain argparse refuses once an option has split the positionals."""

    def parse_known_args(self, args=None, namespace=None):
        ns, extras = super().parse_known_args(args, namespace)
        if hasattr(ns, "overrides"):
            moved = [a for a in extras if "=" in a and not a.startswith("-")]
            ns.overrides = list(ns.overrides or []) + moved
            extras = [a for a in extras if a not in moved]
        return ns, extras


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `evaluate` and its sub-commands to the `repae` command's sub-parsers."""
    p = subparsers.add_parser("evaluate",
                              help="metrics: FID family, VAE reconstructions, latents, spectra, CKNNA (JSON)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="evaluation", required=True,
                           metavar="{samples,ref-stats,vae,latents,spectrum,cknna}",
                           parser_class=_Parser)
    for add in (_add_samples, _add_ref_stats, _add_vae, _add_latents, _add_spectrum, _add_cknna):
        add(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """`repae evaluate ...` on its own: main(["evaluate", "samples", ...])."""
    parser = Parser(prog="repae")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
