"""``mmfm check [RESULTS_DIR]``: verify every artifact of a results folder and say how to rebuild the bad ones.

What is read, by kind (nothing is written):

- Parquet shards: the footer and its ``mmfm`` metadata, the columns and their widths against it, the row
  counts, and every page with its CRC-32 checksum verified (:func:`mmfm.data.shards.verify_shard`);
- safetensors files: the header against the file's size (a truncated file is found,
  :func:`mmfm.io.read_header`) and the sidecar ``x.json`` against the header's metadata
  (:func:`mmfm.io.read_sidecar`); GMM files and spatial partials also their tensor shapes against their
  metadata (:func:`mmfm.gmm.files.verify`); exports (``runs/*/ema.safetensors``, kind ``mmfm-velocity``)
  the network their metadata describes, built on the ``meta`` device, against their tensors' names and shapes;
- complete checkpoints ``runs/*/step-N/`` whole (:func:`mmfm.train.checkpoint.verify_checkpoint`);
- sample ``.npz`` files: read whole (``allow_pickle=False``, the zip's CRCs), ``arr_0`` uint8 NHWC
  (:func:`mmfm.io.load_samples`); every other ``.json``: it parses.

``--quick`` skips the reads of the data itself (Parquet pages, ``.npz`` arrays): headers and sizes only.
Leftovers of killed writes (``.NAME.tmpPID`` files, ``step-N.tmpPID`` / ``step-N.oldPID`` save folders,
``*.partR-of-W.npz`` sample parts) are listed apart: they are never read as results and are no error.
The bad files are printed one a line (``path: reason``), then the one ``snakemake`` command that recreates
them and everything downstream (:func:`mmfm.recover.rebuild_command`). Exit status 0 when every file is
good, 1 when one is bad.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import zipfile
from pathlib import Path

from mmfm import io
from mmfm.recover import SAME_OPTIONS, CorruptArtifact, locate, rebuild_command

SKIP = ("logs", "benchmarks", "digits")  # folders of the results folder with no artifact we read back
_TMP = re.compile(r"\..+\.tmp\d+")  # mmfm.io.atomic_path
_PART = re.compile(r".+\.part\d+-of-\d+\.npz")  # mmfm.sample's per-rank parts
_CKPT = re.compile(r"step-\d+")
_CKPT_LEFTOVER = re.compile(r"step-\d+\.(tmp|old)\d+")


@dataclasses.dataclass
class Report:
    """What :func:`check` found: ``bad`` ``[(path, reason)]``, ``leftovers``, ``checked`` (files and
    checkpoint folders read) and ``command``, the one that rebuilds the bad ones (None: none is bad, or none
    is a workflow artifact)."""

    results: Path
    checked: int = 0
    bad: list[tuple[Path, str]] = dataclasses.field(default_factory=list)
    leftovers: list[Path] = dataclasses.field(default_factory=list)
    command: str | None = None

    @property
    def ok(self) -> bool:
        return not self.bad

    def to_json(self) -> dict:
        return {"results": str(self.results), "ok": self.ok, "checked": self.checked,
                "bad": [{"path": str(p), "reason": r} for p, r in self.bad],
                "leftovers": [str(p) for p in self.leftovers], "command": self.command}


def _finding(path: Path, err: Exception) -> tuple[Path, str]:
    """``(the bad file, why)``: the file the error names (a sidecar, a checkpoint's file), else ``path``."""
    if isinstance(err, CorruptArtifact):
        return err.path, err.reason
    return path, _reason(path, err)


def _reason(path: Path, err: Exception) -> str:
    return (err.reason if isinstance(err, CorruptArtifact) else str(err)).removeprefix(f"{path}: ")


def check(results: str | os.PathLike = "results", *, quick: bool = False, options: str | None = None) -> Report:
    """Verify every artifact under ``results`` (module doc). ``options``: the run's snakemake options for
    the rebuild command (``--configfile x.yaml``)."""
    root = Path(results)
    if not root.is_dir():
        raise ValueError(f"{root}: no such results folder")
    report = Report(root)
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        keep = []
        for name in sorted(dirnames):
            if (d == root and name in SKIP) or name == "tensorboard":
                continue
            if _CKPT_LEFTOVER.fullmatch(name):
                report.leftovers.append(d / name)
            elif _CKPT.fullmatch(name):
                _checkpoint(d / name, report)
            else:
                keep.append(name)
        dirnames[:] = keep
        for name in sorted(filenames):
            p = d / name
            if _TMP.fullmatch(name) or _PART.fullmatch(name):
                report.leftovers.append(p)
            elif p.suffix in (".parquet", ".safetensors", ".npz", ".json"):
                files.append(p)
    sidecars = {io.sidecar_path(p) for p in files if p.suffix == ".safetensors"}
    for p in files:
        if p in sidecars:
            continue  # read with its tensors
        report.checked += 1
        try:
            _check_file(p, quick)
        except (ValueError, OSError, zipfile.BadZipFile) as err:
            report.bad.append(_finding(p, err))
    report.bad.sort()
    report.command = rebuild_command([p for p, _ in report.bad], options=options or "")
    return report


def _checkpoint(path: Path, report: Report) -> None:
    from mmfm.train import checkpoint

    if not (path / checkpoint.STATE).is_file():
        report.leftovers.append(path)  # an incomplete save: never taken as a checkpoint
        return
    report.checked += 1
    try:
        checkpoint.verify_checkpoint(path)
    except ValueError as err:
        report.bad.append(_finding(path, err))


def _check_file(path: Path, quick: bool) -> None:
    if path.suffix == ".parquet":
        from mmfm.data import shards

        if quick:
            shards.read_metadata(path)
            shards.open_file(path)
        else:
            shards.verify_shard(path, required=path.parent.name == "shards")
    elif path.suffix == ".safetensors":
        _check_tensors(path)
    elif path.suffix == ".npz":
        if quick:
            try:
                with zipfile.ZipFile(path) as z:
                    names = z.namelist()
            except (OSError, zipfile.BadZipFile) as err:
                raise CorruptArtifact(path, f"not a readable .npz file ({type(err).__name__}: {err})") from None
            if "arr_0.npy" not in names:
                raise CorruptArtifact(path, f"no array 'arr_0' (it holds {names})")
        else:
            io.load_samples(path)
    else:
        try:
            json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CorruptArtifact(path, f"not readable JSON ({err})") from None


def _check_tensors(path: Path) -> None:
    from mmfm.gmm import files

    header, meta, _ = io.read_header(path)
    kind = meta.get("kind")
    if kind in (files.CLS_KIND, files.SPATIAL_KIND, files.PARTIAL_KIND):
        files.verify(path)
        return
    io.read_sidecar(path, meta)
    if kind == "mmfm-velocity" or (kind is None and path.name == "ema.safetensors"):
        _check_export(path, header)


def _check_export(path: Path, header: dict) -> None:
    """The network an export's metadata describes, built on the meta device, against its tensors."""
    import torch

    from mmfm.models import velocity

    try:
        meta = velocity.read_metadata(path)
        with torch.device("meta"):
            net = velocity.network_from_metadata(meta)
    except (KeyError, TypeError, ValueError) as err:
        why = _reason(path, err)
        raise CorruptArtifact(path, f"its metadata does not describe a velocity network ({why})") from None
    state = {k: torch.empty(h["shape"], device="meta") for k, h in header.items()}
    try:
        velocity.check_state_dict(net, state, path, velocity.describe_network(meta))
    except ValueError as err:
        raise CorruptArtifact(path, f"its tensors disagree with its metadata: {_reason(path, err)}") from None


def format_report(report: Report, options: str | None = None) -> str:
    """The lines ``mmfm check`` prints: the bad files, the leftovers, the command."""
    lines = [f"{p}: {reason}" for p, reason in report.bad]
    if report.leftovers:
        lines.append(f"{len(report.leftovers)} leftover(s) of killed writes (never read; safe to delete): "
                     + ", ".join(map(str, report.leftovers)))
    if report.ok:
        lines.append(f"{report.results}: all {report.checked} artifacts are good")
        return "\n".join(lines)
    outside = [p for p, _ in report.bad if locate(p) is None]
    if outside:
        lines.append("not made by the workflow (write them again with the mmfm command that made them): "
                     + ", ".join(map(str, outside)))
    if report.command:
        where = "" if options else f" ({SAME_OPTIONS})"
        lines.append(f"{len(report.bad)} bad of {report.checked}; to recreate them and everything after them, "
                     f"run{where}:")
        lines.append(f"  {report.command}")
    return "\n".join(lines)
