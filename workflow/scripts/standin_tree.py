"""Build empty stand-ins for the local artifacts a config points at, to dry-run a preset anywhere.

    python workflow/scripts/standin_tree.py workflow/presets/imagenet256-dinov2.yaml /tmp/standin
    snakemake -n --configfile $PWD/workflow/presets/imagenet256-dinov2.yaml --directory /tmp/standin

Every path of :func:`mmfm.config.artifacts` (image folder, encoder folder, normalization statistics,
decoder, FID reference, Inception weights, guide files) is created under ROOT (relative paths) as an
empty folder or file (the image folder: one class of ``gmm.k`` empty image files), so the workflow's
start-up checks pass and ``snakemake -n`` lists the full DAG.
Nothing here is a usable artifact: a real run needs the files README.md describes. Absolute paths in
the config are left alone (and reported if missing). Not a Snakemake script; run it by hand or from
tests/workflow.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml


def build(config_path: str | Path, root: str | Path) -> list[Path]:
    """Create the stand-ins of ``config_path``'s artifacts under ``root``; returns what was created."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
    from mmfm.config import artifacts

    config = yaml.safe_load(Path(config_path).read_text())
    root = Path(root)
    made = []
    for art in artifacts(config):
        p = Path(art.path)
        if p.is_absolute():
            if not p.exists():
                print(f"{art.key}: {p} is absolute and missing; not created", file=sys.stderr)
            continue
        p = root / p
        if art.key == "data.images":  # one class of gmm.k empty image files: the start-up checks count them
            (p / "class0").mkdir(parents=True, exist_ok=True)
            for i in range(int((config.get("gmm") or {}).get("k", 1))):
                (p / "class0" / f"standin_{i:05d}.JPEG").touch()
        elif art.folder:
            p.mkdir(parents=True, exist_ok=True)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.touch()
        made.append(p)
    return made


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="a preset or config file")
    ap.add_argument("root", help="the working directory to build the stand-ins in (snakemake --directory)")
    args = ap.parse_args(argv)
    for p in build(args.config, args.root):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
