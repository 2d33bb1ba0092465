"""Read and validate a workflow config the way the Snakefile does, before anything is downloaded.

The Snakefile validates in two steps, and so does :func:`load_config`, with the same code and messages:

1. ``snakemake.utils.validate(config, schema)`` (types, ranges, unknown keys; fills in the schema's
   defaults); on failure every violation from :func:`mmfm.config.schema_errors`, as ``invalid config:`` and one
   line per problem;
2. :func:`mmfm.config.check` (``invalid config: <key>: ...``).

The one difference: :func:`mmfm.config.check` also requires every local artifact (image folder, encoder,
decoder, statistics, FID reference, Inception weights, guide files) to exist, and a plan is meant for before
they are downloaded. A missing artifact is therefore reported as a note, not an error: when ``check`` stops at
a missing artifact, that path is replaced (in a copy of the config that only the check sees) by an empty
stand-in of the same name and kind, and ``check`` runs again, until it passes or stops at something else. So
every other rule ``check`` enforces still applies, with its own message, and an artifact that exists but has
the wrong kind (a file where a folder belongs) is still an error.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import yaml

from mmfm import config as mc

#: The repository root of a source checkout (``src/mmfm/plan/load.py`` -> three levels up).
REPO = Path(__file__).resolve().parents[3]
SCHEMA = Path("workflow") / "schemas" / "config.schema.yaml"


class PlanError(ValueError):
    """A config the workflow would refuse (same message as ``snakemake``), or bad plan options."""


def schema_path(root: str | Path | None = None) -> Path:
    """The workflow's JSON schema: under ``root`` (a checkout) if it has one, else this package's checkout."""
    for base in ([Path(root)] if root is not None else []) + [REPO]:
        if (base / SCHEMA).is_file():
            return base / SCHEMA
    raise PlanError(f"{SCHEMA}: not found under {root} or {REPO}; run mmfm plan from the repository")


def default_configfile(root: str | Path = ".") -> Path:
    """The config ``snakemake`` reads without ``--configfile``: ``config.yaml`` beside the Snakefile."""
    here = Path(root) / "config.yaml"
    return here if here.is_file() else REPO / "config.yaml"


def read_configfile(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise PlanError(f"--configfile: {path}: no such file")
    try:
        cfg = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise PlanError(f"--configfile: {path}: not valid YAML ({err})") from None
    if not isinstance(cfg, dict):
        raise PlanError(f"--configfile: {path}: expected a mapping of config sections")
    return cfg


def validate(config: dict, root: str | Path = ".") -> tuple[dict, list[str]]:
    """``(config with the schema's defaults, notes)``; raises :class:`PlanError` with ``snakemake``'s message
    when the workflow would refuse it. ``root``: the working directory relative paths are taken from."""
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate as smk_validate

    config = copy.deepcopy(config)
    schema = schema_path(root)
    try:
        smk_validate(config, str(schema))  # also fills in the schema's defaults, as in the Snakefile
    except WorkflowError:
        problems = mc.schema_errors(config, schema)
        raise PlanError("invalid config:\n  " + "\n  ".join(problems)) from None
    notes = check_settings(config, root)
    return config, notes


def check_settings(config: dict, root: str | Path = ".") -> list[str]:
    """:func:`mmfm.config.check` with missing artifacts turned into notes (module doc)."""
    root = Path(root)
    trial = copy.deepcopy(config)
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="mmfm-plan-") as tmp:
        listed = True  # the image folder's checks (gmm.k, empty classes) need the real folder
        for _ in range(len(mc.artifacts(config)) + 2):  # each missing artifact, the Inception weights
            try:
                mc.check(trial, root, images=listed)
                return notes
            except mc.ConfigError as err:
                art = _missing_artifact(trial, root, str(err))
                if art is None and str(err).startswith("eval.inception: metric fid needs"):  # the hub cache's
                    art = mc.Artifact("eval.inception", mc.FID_WEIGHTS_FILE)  # weights, not downloaded yet
                if art is None:
                    raise PlanError(f"invalid config: {err}") from None
                notes.append(f"{art.key}: {art.path} does not exist yet (the plan does not need it; the workflow "
                             "does: see README, 'Artifacts for the presets')")
                _stand_in(trial, art, Path(tmp))
                listed = listed and art.key != "data.images"
    raise PlanError("invalid config: the artifact checks did not settle")  # pragma: no cover


def _missing_artifact(config: dict, root: Path, message: str) -> mc.Artifact | None:
    """The artifact whose absence ``message`` reports (``"<key>: <path> does not exist ..."``), if any."""
    for art in mc.artifacts(config):
        p = Path(art.path)
        if message.startswith(f"{art.key}: {art.path} does not exist") and not (p if p.is_absolute() else root / p).exists():
            return art
    return None


def _stand_in(config: dict, art: mc.Artifact, tmp: Path) -> None:
    """Point ``art.key`` of ``config`` at an empty file or folder of the same name under ``tmp``."""
    target = tmp / str(len(list(tmp.iterdir()))) / Path(art.path).name
    if art.folder:
        target.mkdir(parents=True)
    else:
        target.parent.mkdir(parents=True)
        target.touch()
    keys = art.key.split(".")
    node = config
    if keys[0] == "runs":  # runs.<run>.sample.guide: the run's own sample section, or the shared one
        run = keys[1]
        spec = config["runs"][run]
        if (spec.get("sample") or {}).get("guide") == art.path:
            spec["sample"]["guide"] = str(target)
        else:
            spec.setdefault("sample", {})["guide"] = str(target)
        return
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = str(target)
