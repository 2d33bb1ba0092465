"""The way back from a bad artifact: the one ``snakemake`` command that recreates it and everything after it.

A file of a results folder (``results/`` by default, the config's ``results_dir``) is recreated by forcing
the job that wrote it: ``snakemake --cores all --forcerun FILE``. Snakemake then reruns that job and, as
their input was updated by another job, every job downstream of it, also when ``FILE`` is missing. Plain
``snakemake`` is not enough: it does not rebuild a missing intermediate file whose downstream outputs
exist ("Nothing to be done"). ``--forcerun`` takes the files as the rules name them, relative to the
working directory snakemake runs in (an absolute path is "No rule to produce"), so the command is written
from there: the nearest folder above the file holding Snakemake's ``.snakemake/``, else the current one.

Files that are not a rule's output are mapped to the output written beside them by the same job
(``cls.json`` -> ``cls.safetensors``, ``runs/R/metrics.csv`` -> ``runs/R/ema.safetensors``, a sample grid to
its ``.npz``). A training checkpoint is no output: a bad one is removed (``rm -r``), and the run resumes
from the previous complete checkpoint, or starts afresh, the next time it trains.

Nothing here imports the rest of the package (the readers in :mod:`mmfm.io` raise :class:`CorruptArtifact`).
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterable
from pathlib import Path

#: Said when the command is not known to be the run's own (its ``--configfile`` / ``--config`` / profile).
SAME_OPTIONS = "with the --configfile/--config/--profile of the run, if it had any"

# the layout of a results folder (workflow/rules/common.smk): (pattern of the path inside it, the rule output
# of the same job; None: a checkpoint, removed). RUN and N are run names and numbers.
_LAYOUT = [
    (r"shards/shard-\d+\.parquet", "{0}"),
    (r"gmm/cls(\.safetensors|\.json|_weights\.png)", "gmm/cls.safetensors"),
    (r"gmm/partials/group-\d+\.safetensors", "{0}"),
    (r"gmm/spatial\.(safetensors|json)", "gmm/spatial.safetensors"),
    (r"runs/[^/]+/step-\d+", None),
    (r"runs/[^/]+/step-\d+/[^/]+", None),
    (r"runs/([^/]+)/(ema\.safetensors|ema\.json|metrics\.csv|fd\.csv|train\.yaml)", "runs/{1}/ema.safetensors"),
    (r"samples/([^/]+)/(nfe-\d+)\.(npz|png)", "samples/{1}/{2}.npz"),
    (r"samples/([^/]+)/([^/]+)/(nfe-\d+)\.(npz|png)", "samples/{1}/{2}/{3}.npz"),  # a further sampler's set
    (r"eval/([^/]+)/(nfe_curve\.csv|final\.json)", "eval/{1}/nfe_curve.csv"),
    (r"eval/([^/]+)/([^/]+)/nfe_curve\.csv", "eval/{1}/{2}/nfe_curve.csv"),
    (r"toy_r10/r10\.(json|csv|png)", "toy_r10/r10.json"),
    (r"summary\.json|report/[^/]+", "summary.json"),
]
_DEPTH = 4  # path components of the longest pattern


class CorruptArtifact(ValueError):
    """A file that cannot be read as what it should be. The message names it, says why, and ends with
    the command that rebuilds it (:func:`rebuild_hint`; ``hint`` replaces it); ``path`` and ``reason`` are kept
    apart for callers."""

    def __init__(self, path: str | os.PathLike, reason: str, hint: str | None = None):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: {reason}; {hint or rebuild_hint([path])}")


def locate(path: str | os.PathLike) -> tuple[Path, str, bool] | None:
    """``(results folder, file inside it, force)`` of a workflow artifact: the rule output to force (``force``
    true) or the checkpoint folder to remove; None for a file that is not laid out as an artifact."""
    parts = Path(os.path.abspath(path)).parts
    for depth in range(1, min(_DEPTH, len(parts) - 1) + 1):
        inner = "/".join(parts[-depth:])
        for pattern, target in _LAYOUT:
            m = re.fullmatch(pattern, inner)
            if m:
                root = Path(*parts[:-depth])
                if target is None:  # a checkpoint, or a file in one: the folder runs/RUN/step-N
                    return root, "/".join(parts[-depth:][:3]), False
                return root, target.format(inner, *m.groups()), True
    return None


def _workdir(root: Path) -> Path:
    """Where snakemake ran for the results folder ``root``: the nearest folder above it holding
    ``.snakemake/``; else the current folder when ``root`` is inside it; else ``root``'s parent."""
    for d in root.parents:
        if (d / ".snakemake").is_dir():
            return d
    cwd = Path.cwd()
    return cwd if cwd in root.parents else root.parent


def rebuild_command(paths: Iterable[str | os.PathLike], *, options: str = "") -> str | None:
    """The shell command that recreates the workflow artifacts ``paths`` and everything downstream of them:
    ``[cd WORKDIR && ][rm -r CHECKPOINT... && ]snakemake --cores all [OPTIONS] [--forcerun FILE...]``.

    ``options``: the run's own snakemake options (``--configfile x.yaml``), put before ``--forcerun``.
    None when no path is a workflow artifact (:func:`locate`)."""
    found = [loc for loc in map(locate, paths) if loc is not None]
    if not found:
        return None
    workdir = _workdir(found[0][0])
    forced, removed = [], []
    for root, inner, force in found:
        (forced if force else removed).append(os.path.relpath(root / inner, workdir))
    forced, removed = sorted(set(forced)), sorted(set(removed))
    cmd = []
    if workdir != Path.cwd():
        cmd.append(f"cd {shlex.quote(str(workdir))} &&")
    if removed:
        cmd.append(f"rm -r {' '.join(map(shlex.quote, removed))} &&")
    cmd.append("snakemake --cores all")
    if options:
        cmd.append(options)
    if forced:
        cmd.append("--forcerun " + " ".join(map(shlex.quote, forced)))
    return " ".join(cmd)


def rebuild_hint(paths: Iterable[str | os.PathLike], *, options: str | None = None) -> str:
    """One sentence that ends with :func:`rebuild_command` (without ``options``: a reminder to add the run's),
    or, for files the workflow does not make, says to write them again with the command that made them."""
    cmd = rebuild_command(paths, options=options or "")
    if cmd is None:
        return "it is no output of the workflow: write it again with the mmfm command that made it"
    where = "" if options is not None else f" ({SAME_OPTIONS})"
    return f"to rebuild it and everything after it, run{where}: {cmd}"
