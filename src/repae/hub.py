"""Hugging Face hub ids for weight files: `hf:owner/name[@revision][/path/in/repo]`.

Every place that takes a weight file (SiT checkpoints, VAEs, latent statistics, discriminators,
alignment encoders, LPIPS/VGG, Inception) passes the user's string through `local_path`: a local
path comes back unchanged, a hub id comes back as a file (or, for diffusers VAEs and encoders, a
directory) in the huggingface_hub cache. Downloads go through `hf_hub_download` / `snapshot_download`,
so the cache, revision pinning and `HF_HUB_OFFLINE=1` behave as everywhere else in that ecosystem.

The grammar is the one `huggingface_hub`'s own `hf://` file system uses: `@revision` (a branch,
tag or commit sha, without '/') follows the repo name, the path in the repo comes last:

    hf:REPA-E/e2e-sdvae                          the released file for what the caller loads
    hf:REPA-E/e2e-sdvae/e2e-sdvae-400k.pt        one named file
    hf:REPA-E/e2e-sdvae@<sha>/e2e-sdvae-400k.pt  pinned to a commit

An id without a file picks the file for the kind of weight asked for: from `RELEASES` for the
REPA-E artefacts, else by name from the repo's file list (one candidate, or an error listing them).
Every failure is one `HubError` naming the id, the file and what to do (`hub_error`).
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from repae.weights import CheckpointError

PREFIX = "hf:"
# what the caller is loading; decides which file an id without a file stands for
KINDS = ("sit", "vae", "latent_stats", "discriminator", "encoder", "vgg", "lpips", "inception", "file")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
DIFFUSERS_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
ENCODER_PATTERNS = ["*.safetensors", "*.json", "*.bin"]  # an HF transformers encoder: weights + config only

_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"  # the hub's owner / repo name rule
_ID = re.compile(rf"^(?P<repo>{_NAME}/{_NAME})(?:@(?P<revision>[A-Za-z0-9._-]+))?(?:/(?P<file>.+))?$")
SYNTAX = ("hf:owner/name[@revision][/path/in/repo], e.g. hf:REPA-E/e2e-sdvae or "
          "hf:REPA-E/e2e-sdvae@<sha>/e2e-sdvae-400k.pt")


class HubError(CheckpointError):
    """A hub id that cannot be turned into a local file: malformed, not on the hub, or not cached offline."""


@dataclass(frozen=True)
class HubId:
    text: str  # as the user wrote it
    repo_id: str  # owner/name
    revision: Optional[str]  # branch, tag or commit sha; None = main
    filename: Optional[str]  # path inside the repo; None = chosen by kind


def is_hub_id(ref: object) -> bool:
    return isinstance(ref, str) and ref.startswith(PREFIX)


def parse_hub_id(text: str) -> HubId:
    """`hf:owner/name[@revision][/path/in/repo]` -> HubId; HubError (one line, the grammar) if malformed."""
    m = _ID.match(text[len(PREFIX):]) if is_hub_id(text) else None
    repo = m.group("repo") if m else ""
    file = m.group("file") if m else None
    bad_repo = "--" in repo or ".." in repo
    bad_file = file is not None and any(part in ("", ".", "..") for part in file.split("/"))
    if m is None or bad_repo or bad_file:
        raise HubError(f"{text}: not a hub id; expected {SYNTAX}")
    return HubId(text, repo, m.group("revision"), file)


# ------------------------------------------------------------------ the released REPA-E artefacts


@dataclass(frozen=True)
class SampleProtocol:
    """How the README of End2End-Diffusion/REPA-E samples a released SiT for its FID table."""

    preset: str
    cfg_scale: float
    guidance_high: float
    label_sampling: str  # balanced (50 per class) | uniform
    published_fid: float  # gFID-50k with CFG in that README, for the record
    vae: Optional[str] = None  # hub id of its VAE; None: the VAE bundled in the checkpoint
    latent_stats: Optional[str] = None  # hub id of the statistics its latents were normalised with
    guidance_low: float = 0.0
    mode: str = "sde"
    num_steps: int = 250

    def overrides(self) -> List[str]:
        out = [f"sample.mode={self.mode}", f"sample.num_steps={self.num_steps}", f"sample.cfg_scale={self.cfg_scale}",
               f"sample.guidance_low={self.guidance_low}", f"sample.guidance_high={self.guidance_high}",
               f"eval.label_sampling={self.label_sampling}"]
        return out + ([f"vae.latent_stats_path={self.latent_stats}"] if self.latent_stats else [])


@dataclass(frozen=True)
class Release:
    """A REPA-E repo: the file in it for each kind (`.`: the repo directory, a diffusers VAE).
    Kinds not listed are picked from the repo's file list like any other repo."""

    files: Dict[str, str] = field(default_factory=dict)
    sample: Optional[SampleProtocol] = None


def _e2e_vae(name: str) -> Release:
    # file names: the official README (e2e-vavae-400k.pt) and the same pattern for the other two;
    # statistics beside the VAE as the official generate.py expects them (VAE.pt -> VAE-latents-stats.pt)
    return Release({"vae": f"{name}-400k.pt", "latent_stats": f"{name}-400k-latents-stats.pt"})


def _repae_sit(preset: str, cfg: float, high: float, fid: float) -> Release:
    # a REPA-E training checkpoint: EMA SiT (with its latent BatchNorm statistics) and the tuned VAE
    ckpt = "checkpoints/0400000.pt"
    return Release({"sit": ckpt, "vae": ckpt}, SampleProtocol(preset, cfg, high, "uniform", fid))


RELEASES: Dict[str, Release] = {
    "REPA-E/sdvae": Release({"vae": "sdvae-f8d4.pt", "discriminator": "sdvae-f8d4-discriminator-ckpt.pt",
                             "latent_stats": "sdvae-f8d4-latents-stats.pt"}),
    "REPA-E/invae": Release(),  # f16d32; file names not in the official README: picked from the file list
    "REPA-E/vavae": Release(),
    "REPA-E/e2e-sdvae": _e2e_vae("e2e-sdvae"),
    "REPA-E/e2e-invae": _e2e_vae("e2e-invae"),
    "REPA-E/e2e-vavae": _e2e_vae("e2e-vavae"),
    "REPA-E/e2e-sdvae-hf": Release({"vae": "."}),
    "REPA-E/e2e-invae-hf": Release({"vae": "."}),
    "REPA-E/e2e-vavae-hf": Release({"vae": "."}),
    "REPA-E/sit-repae-sdvae": _repae_sit("sit-xl2-f8d4", 2.2, 0.65, 1.67),
    "REPA-E/sit-repae-invae": _repae_sit("sit-xl1-f16d32", 1.8, 0.825, 1.61),
    "REPA-E/sit-repae-vavae": _repae_sit("sit-xl1-f16d32", 1.9, 0.825, 1.73),
    "REPA-E/sit-ldm-e2e-vavae": Release({"sit": "checkpoints/4000000.pt"}, SampleProtocol(
        "sit-xl1-f16d32", 2.4, 0.73, "balanced", 1.12, vae="hf:REPA-E/e2e-vavae", latent_stats="hf:REPA-E/e2e-vavae")),
}


def sample_protocol(ref: Optional[str]) -> Optional[SampleProtocol]:
    """The published sampling protocol of a released SiT named by `ref` (a hub id), else None."""
    if not is_hub_id(ref):
        return None
    release = RELEASES.get(parse_hub_id(ref).repo_id)
    return release.sample if release else None


def apply_sample_protocol(ckpt: Optional[str], preset: Optional[str], overrides: Sequence[str],
                          vae: Optional[str]) -> Tuple[Optional[str], List[str], Optional[str]]:
    """(preset, overrides, vae) for sampling `ckpt`: for a released SiT its preset (unless one other
    than the default toy was given), the published protocol before the user's overrides (which win),
    and its VAE unless --vae was given. Unchanged for anything else."""
    protocol = sample_protocol(ckpt)
    if protocol is None:
        return preset, list(overrides), vae
    return (protocol.preset if preset in (None, "toy") else preset, [*protocol.overrides(), *overrides],
            vae or protocol.vae or ckpt)


# ------------------------------------------------------------------------------- resolving


def _offline() -> bool:
    # read at call time: huggingface_hub reads HF_HUB_OFFLINE once, at import
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return constants.HF_HUB_OFFLINE if env is None else env.strip().upper() in ("1", "ON", "YES", "TRUE")


def _cache_dir() -> str:
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return constants.HF_HUB_CACHE


def _download_hint(hid: HubId, file: Optional[str]) -> str:
    rev = f" --revision {hid.revision}" if hid.revision else ""
    return f"`hf download {hid.repo_id}{' ' + file if file and file != '.' else ''}{rev}`"


def hub_error(hid: HubId, file: Optional[str], problem: str, advice: Optional[str] = None) -> HubError:
    """The one error format: `ID: file FILE PROBLEM; WHAT TO DO` (default: download it elsewhere, or a local path)."""
    what = f"file {file}" if file and file != "." else f"the repo {hid.repo_id}"
    advice = advice or (f"download it on a machine with internet ({_download_hint(hid, file)}) and copy the hub "
                        f"cache over, or pass a local path")
    return HubError(f"{hid.text}: {what} {problem}; {advice}")


def _translate(hid: HubId, file: Optional[str], err: Exception) -> HubError:
    from huggingface_hub.utils import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                       RepositoryNotFoundError, RevisionNotFoundError)

    rev = f" at revision {hid.revision}" if hid.revision else ""
    if isinstance(err, LocalEntryNotFoundError):
        why = "HF_HUB_OFFLINE=1" if _offline() else "the hub could not be reached"
        return hub_error(hid, file, f"is not in the local hub cache ({_cache_dir()}){rev} and {why}")
    if isinstance(err, GatedRepoError):
        return hub_error(hid, file, "is in a gated repo: accept its terms on huggingface.co and log in "
                                    "(`hf auth login`)")
    if isinstance(err, RepositoryNotFoundError):
        return hub_error(hid, file, "cannot be fetched: no such hub repo (or it is private: log in with "
                                    "`hf auth login`)")
    if isinstance(err, RevisionNotFoundError):
        return hub_error(hid, file, f"cannot be fetched: {hid.repo_id} has no revision {hid.revision}")
    if isinstance(err, EntryNotFoundError):
        return hub_error(hid, file, f"is not in the hub repo {hid.repo_id}{rev}")
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return hub_error(hid, file, f"could not be fetched ({reason[:200]})")


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise HubError("hub ids (hf:...) need huggingface_hub: pip install 'repae[hub]', or download the file "
                       "yourself and pass its local path") from None
    return huggingface_hub


def _download(hid: HubId, file: str) -> Path:
    try:
        return Path(_hub().hf_hub_download(hid.repo_id, file, revision=hid.revision, cache_dir=_cache_dir(),
                                           local_files_only=_offline()))
    except HubError:
        raise
    except Exception as err:  # the hub raises many types; one message with the id and file either way
        raise _translate(hid, file, err) from None


def _snapshot(hid: HubId, patterns: Optional[List[str]], file: Optional[str] = None) -> Path:
    try:
        return Path(_hub().snapshot_download(hid.repo_id, revision=hid.revision, cache_dir=_cache_dir(),
                                             allow_patterns=patterns, local_files_only=_offline()))
    except HubError:
        raise
    except Exception as err:
        raise _translate(hid, file, err) from None


def _repo_files(hid: HubId) -> List[str]:
    """The repo's file list: from the hub when online, else from the cached snapshot."""
    if not _offline():
        try:
            return sorted(_hub().list_repo_files(hid.repo_id, revision=hid.revision))
        except HubError:
            raise
        except Exception as err:
            from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

            if isinstance(err, (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError)):
                raise _translate(hid, None, err) from None
            # unreachable hub: fall back to whatever the cache holds
    try:
        root = Path(_hub().snapshot_download(hid.repo_id, revision=hid.revision, cache_dir=_cache_dir(),
                                             local_files_only=True))
    except Exception as err:
        raise _translate(hid, None, err) from None
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink())


def _is_weight(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES)


_KIND_RULES = {  # kind -> (patterns a candidate matches, patterns that exclude it)
    "latent_stats": (["*latents-stats.pt", "*latent_stats.safetensors"], []),
    "discriminator": (["*discriminator*"], []),
    "sit": (["checkpoints/*", "*"], ["*latents-stats*", "*latent_stats*", "*discriminator*"]),
    "vae": (["*"], ["*latents-stats*", "*latent_stats*", "*discriminator*", "checkpoints/*"]),
}


def _candidates(files: List[str], kind: str) -> List[str]:
    include, exclude = _KIND_RULES.get(kind, (["*"], []))
    weights = [f for f in files if _is_weight(f) and not any(fnmatch.fnmatch(f, x) for x in exclude)]
    for pattern in include:  # the first pattern with any match wins (SiT: checkpoints/ before the root)
        found = [f for f in weights if fnmatch.fnmatch(f, pattern)]
        if found:
            return found
    return []


def _choose(hid: HubId, kind: str) -> str:
    """The file (or '.') an id without a file stands for when loading `kind`."""
    release = RELEASES.get(hid.repo_id)
    if release and kind == "file":  # no kind given: the release's main artefact
        kind = next((k for k in ("sit", "vae") if k in release.files), kind)
    if release and kind in release.files:
        return release.files[kind]
    files = _repo_files(hid)
    if kind in ("vae", "file") and all(f in files for f in DIFFUSERS_FILES):
        return "."
    found = _candidates(files, kind)
    if len(found) == 1:
        return found[0]
    what = kind.replace("_", " ") + (" file" if kind != "file" else "")
    at = f"@{hid.revision}" if hid.revision else ""
    if not found:
        raise hub_error(hid, None, f"holds no {what} (files: {', '.join(files[:12]) or 'none cached'})",
                        f"name the file: {PREFIX}{hid.repo_id}{at}/FILE, or pass a local path")
    raise hub_error(hid, None, f"holds several {what}s ({', '.join(found[:12])})",
                    f"name one, e.g. {PREFIX}{hid.repo_id}{at}/{found[0]}")


def resolve(ref: str, kind: str = "file") -> Path:
    """A hub id -> the local file (or directory) it names in the huggingface_hub cache.

    kind (one of KINDS) decides the file of an id that names none, and the form: a diffusers VAE
    or an encoder repo comes back as its snapshot directory. HubError on any failure."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    hid = parse_hub_id(ref)
    if hid.filename is None and kind == "encoder" and hid.repo_id not in RELEASES:
        return _snapshot(hid, ENCODER_PATTERNS)  # HF transformers layout: read as a directory
    file = hid.filename or _choose(hid, kind)
    if file == ".":  # a diffusers VAE: config + weights only
        return _snapshot(hid, list(DIFFUSERS_FILES))
    return _download(hid, file)


PathLike = Union[str, "os.PathLike[str]"]


def local_path(ref: Optional[PathLike], kind: str = "file") -> Optional[PathLike]:
    """`ref` unchanged when it is not a hub id (None, a local path); else `resolve(ref, kind)`."""
    return resolve(ref, kind) if is_hub_id(ref) else ref



def dataset_dir(ref: str, patterns: Optional[List[str]] = None) -> Path:
    """A dataset repo id `hf:owner/name[@revision][/sub/dir]` -> that directory of its snapshot in the
    huggingface_hub cache (online and not HF_HUB_OFFLINE: the files matching `patterns` are fetched first).
    HubError (the one format) if the repo or the directory is not there."""
    hid = parse_hub_id(ref)
    sub = hid.filename
    if sub and patterns:
        patterns = [f"{sub}/{p}" for p in patterns]
    try:
        root = Path(_hub().snapshot_download(hid.repo_id, repo_type="dataset", revision=hid.revision,
                                             cache_dir=_cache_dir(), allow_patterns=patterns,
                                             local_files_only=_offline()))
    except HubError:
        raise
    except Exception as err:
        raise _translate(hid, sub, err) from None
    path = root / sub if sub else root
    if not path.is_dir():
        raise hub_error(hid, sub, f"is not a directory of the dataset repo {hid.repo_id}",
                        f"name one of its directories, e.g. {PREFIX}{hid.repo_id}/data")
    return path
