"""A typed view of the workflow's ``config.yaml`` (docs/design.md §5) and the checks a JSON schema cannot make.

The workflow validates the config against ``workflow/schemas/config.schema.yaml`` first (types, ranges,
unknown keys, defaults filled in), then calls :func:`check`, which stops before any job with a message
that names the key (``runs.gmm-mode.sample.guide: ...``) or the file:

- every run's effective training settings build a :class:`~mmfm.train.config.TrainConfig`
  (source / coupling / conditioning combinations, the model preset, the learning-rate phases);
- a guide (autoguidance) names another run or an existing file; ``report.baseline`` names a run;
  ``eval.final_nfe`` is one of ``eval.nfe``;
- every local artifact the config points at exists (image folder, encoder folder, normalization
  statistics, decoder, FID reference and Inception weights);
- the tokenizer settings fit the tokenizer (``patch_size`` / ``pool`` are for ``pixels`` only, a
  transformers tokenizer needs its decoder to turn samples into images);
- from the image folder's listing: one subfolder per class, each with at least one readable image, and at
  least ``gmm.k`` rows to fit the mixture on; ``eval.metric: fid`` finds the Inception weights.

:func:`disk_warnings` compares the free space of ``results_dir`` with what the shards will take.

The helpers (:func:`train_settings`, :func:`sample_settings`, :func:`resources`, ...) are what the
rules pass as ``params:``: each rule receives exactly its section, so Snakemake's ``params`` rerun
trigger reruns exactly the stages whose settings changed. This module imports no torch at import
time; :func:`check` imports :mod:`mmfm.train.config` when it can (and skips that part when torch is
not installed in the environment that runs Snakemake).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Stages whose resources the config sets (``resources.<rule>``); a run's ``resources`` overrides train / sample.
RULES = ("export_digits", "encode", "fit_cls_gmm", "spatial_stats", "spatial_gmm", "train", "sample", "evaluate",
         "toy_r10", "report")
#: Resources of a rule the config leaves out.
DEFAULT_RESOURCES = {"threads": 1, "gpu": 0, "mem_mb": 2000, "runtime": 60}
#: Stages that may run over several nodes (one torchrun agent per node, :mod:`mmfm.launch`).
MULTI_NODE = ("train", "sample")
#: Run-level keys that go into the training settings.
RUN_TRAIN_KEYS = ("source", "coupling", "conditioning", "method")
#: A run's ``method`` when it gives none.
DEFAULT_METHOD = "fm"
#: The samplers of a GMFlow network's mixture (the others sample any run, a GMFlow one by its mean velocity).
GM_SAMPLERS = ("gm-ode", "gm-sde")
#: The samplers of a DMF flow map (the others sample a DMF run by its velocity, the flow map at r = t).
FLOWMAP_SAMPLERS = ("flowmap", "flowmap-restart")
#: The sampler of a DFM network's stages (the only one that samples it).
DFM_SAMPLERS = ("dfm-euler",)


class ConfigError(ValueError):
    """An invalid workflow configuration; the message starts with the key (``runs.x.train.lr: ...``)."""


@dataclass(frozen=True)
class Artifact:
    """A local file or folder the config points at: its key, its path and whether it must be a folder."""

    key: str
    path: str
    folder: bool = False


# ------------------------------------------------------------------------------------------------ typed view


def results_dir(config: dict) -> str:
    """The folder every output of the workflow goes to (``results_dir``, default ``results``), without a
    trailing slash."""
    return str(config.get("results_dir") or "results").rstrip("/") or "/"


def run_names(config: dict) -> list[str]:
    """The runs, in config order."""
    return list(config["runs"])


def evaluated_runs(config: dict) -> list[str]:
    """The runs that are sampled, evaluated and reported (``evaluate`` true; autoguides are trained only)."""
    return [r for r in config["runs"] if config["runs"][r].get("evaluate", True)]


def train_settings(config: dict, run: str) -> dict[str, Any]:
    """The effective training settings of ``run``: the shared ``train`` section, the run's own ``train``
    over it, then the run's ``source`` / ``coupling`` / ``conditioning`` (and ``model`` when set, and ``method``
    when it is not ``fm``).

    The GMM file paths are not in it (they are the rule's inputs; :func:`with_gmm_files` adds them)."""
    spec = config["runs"][run]
    out = copy.deepcopy(dict(config.get("train") or {}))
    out.update(copy.deepcopy(spec.get("train") or {}))
    for key in RUN_TRAIN_KEYS:
        if key != "method":
            out[key] = spec[key]
        elif spec.get("method", DEFAULT_METHOD) != DEFAULT_METHOD:  # (fm is the default: older runs' settings
            out[key] = spec["method"]  # stay what they were, and nothing reruns)
    if spec.get("model") is not None:
        out["model"] = spec["model"]
    return out


def with_gmm_files(settings: dict, spatial_gmm: str | None, cls_gmm: str | None) -> dict:
    """``settings`` with the GMM files a GMM source / mode coupling needs (``gmm``, ``cls_gmm``)."""
    out = dict(settings)
    if out.get("source") == "gmm":
        out["gmm"] = str(spatial_gmm)
        if str(out.get("coupling", "")).startswith("mode"):
            out["cls_gmm"] = str(cls_gmm)
    return out


def uses_gmm(config: dict, run: str) -> bool:
    return config["runs"][run]["source"] == "gmm"


def any_gmm(config: dict) -> bool:
    """Whether some run draws from the GMM (else the GMM stages are not part of the DAG)."""
    return any(uses_gmm(config, r) for r in run_names(config))


def shard_groups(num_shards: int, groups: int | None = None) -> list[range]:
    """The shards of each spatial-statistics map job: ``groups`` contiguous ranges of ``range(num_shards)``,
    sizes differing by at most one (``None``: one group per shard)."""
    groups = num_shards if groups is None else groups
    if not 1 <= groups <= num_shards:
        raise ConfigError(f"spatial.groups: {groups} map jobs over shards.num_shards = {num_shards} shards; each "
                          f"group needs a shard (at most {num_shards}, or null for one per shard)")
    return [range(g * num_shards // groups, (g + 1) * num_shards // groups) for g in range(groups)]


def spatial_groups(config: dict) -> list[range]:
    """:func:`shard_groups` of the config (``shards.num_shards``, ``spatial.groups``)."""
    return shard_groups(config["shards"]["num_shards"], (config.get("spatial") or {}).get("groups"))


def sample_settings(config: dict, run: str) -> dict[str, Any]:
    """The effective sampling settings of ``run``: the shared ``sample`` section with the run's own over it."""
    out = copy.deepcopy(dict(config.get("sample") or {}))
    out.update(copy.deepcopy(config["runs"][run].get("sample") or {}))
    return out


def guide_run(config: dict, run: str) -> str | None:
    """The run whose EMA weights guide ``run`` (autoguidance), if its guide names a run."""
    guide = sample_settings(config, run).get("guide")
    return guide if guide in config["runs"] else None


def resources(config: dict, rule: str, run: str | None = None) -> dict[str, int]:
    """The resources of ``rule``'s job (of ``run``'s job for train / sample; the run's ``resources`` win):

    ``threads`` and ``mem_mb`` per node, ``runtime`` (minutes), ``nodes``, ``gpus_per_node`` and ``gpu``
    (all the job's GPUs, ``nodes * gpus_per_node``). A job of one node needs only ``gpu``; one of several
    nodes gives ``nodes`` and ``gpus_per_node`` (or a ``gpu`` that ``nodes`` divides). Inconsistent values
    raise :class:`ConfigError` naming the key."""
    if rule not in RULES:
        raise KeyError(f"resources: unknown rule {rule!r}; expected one of {RULES}")
    given = dict((config.get("resources") or {}).get(rule) or {})
    key = f"resources.{rule}"
    if run is not None:
        mine = ((config["runs"][run].get("resources") or {}).get(rule)) or {}
        if {"gpu", "nodes", "gpus_per_node"} & set(mine):
            key = f"runs.{run}.resources.{rule}"
            if "gpu" not in mine:  # the run's own node layout replaces the shared GPU count
                given.pop("gpu", None)
        given.update(mine)
    out = {**DEFAULT_RESOURCES, **given}
    nodes, gpn = int(given.get("nodes", 1)), given.get("gpus_per_node")
    if nodes > 1 and rule not in MULTI_NODE:
        raise ConfigError(f"{key}.nodes: {nodes}, but only {' and '.join(MULTI_NODE)} run over several nodes")
    if nodes == 1:
        gpu = int(given.get("gpu", gpn if gpn is not None else 0))
        if gpn is not None and gpu > int(gpn):
            raise ConfigError(f"{key}.gpu: {gpu} GPUs do not fit on one node of gpus_per_node {gpn}; set "
                              f"nodes: {-(-gpu // int(gpn))}")
        gpn = gpu
    else:
        if gpn is None:
            if "gpu" not in given or int(given["gpu"]) % nodes:
                raise ConfigError(f"{key}.gpus_per_node: {nodes} nodes need gpus_per_node (or a gpu that nodes "
                                  f"divides; gpu is {given.get('gpu')})")
            gpn = int(given["gpu"]) // nodes
        gpn = int(gpn)
        if "gpu" in given and int(given["gpu"]) != nodes * gpn:
            raise ConfigError(f"{key}.gpu: {given['gpu']} is not nodes x gpus_per_node = {nodes} x {gpn}")
        gpu = nodes * gpn
    out.update(nodes=nodes, gpus_per_node=int(gpn), gpu=gpu)
    return out


def multi_node_runs(config: dict, rule: str) -> list[str]:
    """The runs whose ``rule`` job (train or sample) spans several nodes."""
    return [r for r in run_names(config) if resources(config, rule, r)["nodes"] > 1]


def nfes(config: dict) -> list[int]:
    """The NFE (Euler steps) of the sample sets, sorted."""
    return sorted(int(n) for n in config["eval"]["nfe"])


def final_nfe(config: dict) -> int:
    """The NFE of each run's headline number (``eval.final_nfe``, default the largest of ``eval.nfe``)."""
    value = config["eval"].get("final_nfe")
    return int(value) if value is not None else max(nfes(config))


def baseline(config: dict) -> str:
    """The run the report compares the others with (``report.baseline``, default the first evaluated run)."""
    value = (config.get("report") or {}).get("baseline")
    return value if value is not None else evaluated_runs(config)[0]


def digits(config: dict) -> bool:
    """Whether the images are the embedded digits demo (exported by the first rule)."""
    return config["data"]["source"] == "digits"


def tokenizer_kwargs(encoder: dict, device: str = "cpu", decoder: dict | None = None) -> dict[str, Any]:
    """Keyword arguments of :func:`mmfm.encoders.load_tokenizer` for the ``encoder`` section (and the
    ``decoder`` section, for sampling with a transformers tokenizer)."""
    kw: dict[str, Any] = {"name": encoder["name"], "path": encoder.get("path"), "image_size": encoder.get("image_size"),
                          "device": device, "precision": encoder.get("precision", "fp32")}
    if encoder["name"] == "pixels":
        kw.update({k: encoder[k] for k in ("patch_size", "pool") if encoder.get(k) is not None})
    elif decoder:
        kw["decoder"] = decoder.get("path")
    return kw


def launch_flags(resources: dict, threads: int, allow_cpu_fallback: bool = False) -> list[str]:
    """The ``mmfm train|sample`` flags of a workflow job, from the job's own resources (a profile's
    ``set-resources`` may have changed the config's): the device (``cuda`` when the job has GPUs, and
    then required), the node's ``threads``, and one process per GPU of a node -- ``gpu`` for a job of one
    node; ``tasks`` agents of ``gres: gpu:G`` each, started through srun, for a job of several."""
    agents = int(resources.get("tasks") or 1)
    gres = str(resources.get("gres") or "")
    per_node = int(gres.rsplit(":", 1)[1]) if agents > 1 and gres else int(resources.get("gpu") or 0)
    flags = ["--device", "cuda" if per_node > 0 else "cpu", "--threads", str(threads)]
    if allow_cpu_fallback:
        flags.append("--allow-cpu-fallback")
    if agents > 1:
        return flags + ["--nnodes", str(agents), "--nproc", str(max(1, per_node)), "--srun"]
    return flags + ["--nproc", str(max(1, per_node))]


def device(gpus: int, allow_cpu_fallback: bool = False) -> str:
    """The device of a job asking for ``gpus`` GPUs: ``"cuda"`` (CUDA_VISIBLE_DEVICES picks which), or
    ``"cpu"`` for ``gpus = 0``. A job that asked for a GPU stops with :class:`mmfm.devices.DeviceError`
    (naming why) when CUDA is unusable, unless ``allow_cpu_fallback`` (the config key of that name,
    which the CI cluster's fake GPUs set) makes it warn and use the CPU."""
    if int(gpus) <= 0:
        return "cpu"
    from mmfm.devices import resolve

    return resolve("cuda", gpus=int(gpus), allow_cpu_fallback=allow_cpu_fallback, key="resources gpu")


def job_device(job) -> str:
    """:func:`device` of a running Snakemake job (a script's ``snakemake`` object): its ``gpu`` resource and
    the config's ``allow_cpu_fallback``."""
    return device(job.resources.gpu, job.config.get("allow_cpu_fallback", False))


def artifacts(config: dict) -> list[Artifact]:
    """The local files and folders the config points at (each must exist before the workflow starts)."""
    out = []
    if config["data"]["source"] == "folder" and config["data"].get("images"):
        out.append(Artifact("data.images", config["data"]["images"], folder=True))
    enc = config["encoder"]
    if enc.get("path"):
        out.append(Artifact("encoder.path", enc["path"], folder=True))
    if enc.get("norm_stats"):
        out.append(Artifact("encoder.norm_stats", enc["norm_stats"]))
    if (config.get("decoder") or {}).get("path"):
        out.append(Artifact("decoder.path", config["decoder"]["path"]))
    ev = config["eval"]
    if ev["metric"] == "fid":
        for key in ("reference", "inception"):
            if ev.get(key):
                out.append(Artifact(f"eval.{key}", ev[key]))
    for run in run_names(config):
        guide = sample_settings(config, run).get("guide")
        if guide is not None and guide not in config["runs"]:
            out.append(Artifact(f"runs.{run}.sample.guide", guide))
    return out


# ------------------------------------------------------------------------------------------------ checks


def typed_overrides(value):
    """Snakemake reads nested ``--config`` values with YAML's BaseLoader, so ``runs={x: {train: {lr: 0.002}}}``
    arrives as the string ``'0.002'``; read every such string as YAML again (numbers, booleans, null)."""
    if isinstance(value, dict):
        return {k: typed_overrides(v) for k, v in value.items()}
    if isinstance(value, list):
        return [typed_overrides(v) for v in value]
    if isinstance(value, str):
        import yaml

        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
        return parsed if parsed is None or isinstance(parsed, (bool, int, float, list, dict)) else value
    return value


def schema_errors(config: dict, schema_path: str | Path) -> list[str]:
    """Every violation of the JSON schema, one line each, starting with the dotted key
    (``gmm.k: 0 is less than the minimum of 1``, ``gmm: unknown key 'kk'``)."""
    import jsonschema
    import yaml

    schema = yaml.safe_load(Path(schema_path).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    out = []
    for err in sorted(validator.iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path]):
        where = ".".join(str(p) for p in err.absolute_path) or "config"
        if err.validator == "additionalProperties":
            allowed = sorted(err.schema.get("properties", {}))
            extra = sorted(set(err.instance) - set(allowed)) if isinstance(err.instance, dict) else []
            msg = f"unknown key(s) {extra}" + (f"; expected one of {allowed}" if allowed else "")
        elif err.validator in ("oneOf", "anyOf") and err.context:
            msg = "; ".join(sorted({c.message for c in err.context}))
        else:
            msg = err.message
        out.append(f"{where}: {msg}")
    return out




def check(config: dict, root: str | Path = ".", *, images: bool = True) -> None:
    """Everything the schema cannot say (module doc); raises :class:`ConfigError` naming the key.

    ``config`` must already have passed the schema (defaults filled in); relative paths are taken
    from ``root`` (Snakemake's working directory)."""
    root = Path(root)
    runs = config["runs"]
    # tokenizer
    enc = config["encoder"]
    if enc["name"] == "pixels":
        if enc.get("path"):
            raise ConfigError("encoder.path: the pixels tokenizer takes no weights; set encoder.name to a "
                              "transformers tokenizer or drop encoder.path")
        if (config.get("decoder") or {}).get("path"):
            raise ConfigError("decoder.path: the pixels tokenizer decodes exactly; it takes no decoder")
        if enc.get("precision", "fp32") != "fp32":
            raise ConfigError("encoder.precision: the pixels tokenizer is exact; it runs in fp32 only")
        size = enc.get("image_size") or 8
        for key in ("patch_size", "pool"):
            value = enc.get(key) or 2
            if size % value:
                raise ConfigError(f"encoder.{key}: {value} does not divide encoder.image_size {size}")
    else:
        for key in ("patch_size", "pool"):
            if enc.get(key) is not None:
                raise ConfigError(f"encoder.{key}: applies to the pixels tokenizer only, not {enc['name']!r}")
        if not (config.get("decoder") or {}).get("path"):
            raise ConfigError(f"decoder.path: the {enc['name']} tokenizer needs the RAE decoder checkpoint to "
                              "decode samples into images")
    if config["data"]["source"] == "digits" and config["data"].get("images"):
        raise ConfigError(f"data.images: the digits demo writes its own images to {results_dir(config)}/digits; "
                          "set data.source: folder to read an image folder")
    # spatial statistics
    spatial_groups(config)
    # evaluation
    ev = config["eval"]
    if ev.get("final_nfe") is not None and ev["final_nfe"] not in ev["nfe"]:
        raise ConfigError(f"eval.final_nfe: {ev['final_nfe']} is not one of eval.nfe {ev['nfe']}")
    if ev["metric"] == "fid" and not ev.get("reference"):
        raise ConfigError("eval.reference: metric fid needs the reference statistics (.npz with mu and sigma)")
    # report
    if not evaluated_runs(config):
        raise ConfigError("runs: every run has evaluate: false; nothing would be sampled or reported")
    base = (config.get("report") or {}).get("baseline")
    if base is not None and base not in evaluated_runs(config):
        raise ConfigError(f"report.baseline: {base!r} is not an evaluated run; those are {evaluated_runs(config)}")
    # runs
    _check_samplers(config)
    for run in runs:
        guide = sample_settings(config, run).get("guide")
        if guide is not None:
            if guide == run:
                raise ConfigError(f"runs.{run}.sample.guide: a run cannot guide itself")
            if guide not in runs and not guide.endswith(".safetensors"):
                raise ConfigError(f"runs.{run}.sample.guide: {guide!r} is neither a run ({list(runs)}) nor a "
                                  ".safetensors file")
            if guide in runs:
                mine, theirs = runs[run], runs[guide]
                if mine["conditioning"] != theirs["conditioning"]:
                    raise ConfigError(f"runs.{run}.sample.guide: the guide run {guide!r} has conditioning "
                                      f"{theirs['conditioning']!r}, this run {mine['conditioning']!r}; a guide "
                                      "takes the main model's inputs")
                if guide_run(config, guide) == run:
                    raise ConfigError(f"runs.{run}.sample.guide: {run!r} and {guide!r} guide each other")
        _check_method(config, run, root)  # (its messages name the key; the typed view's then check the values)
        _check_train(config, run)
    for rule in RULES:
        for run in (run_names(config) if rule in ("train", "sample") else [None]):
            resources(config, rule, run)
    # local artifacts
    for art in artifacts(config):
        p = Path(art.path)
        p = p if p.is_absolute() else root / p
        if not p.exists():
            raise ConfigError(f"{art.key}: {art.path} does not exist (see README, 'Artifacts for the presets')")
        if art.folder and not p.is_dir():
            raise ConfigError(f"{art.key}: {art.path} is not a folder")
        if not art.folder and p.is_dir():
            raise ConfigError(f"{art.key}: {art.path} is a folder, expected a file")
    if images:  # (mmfm plan, before the download: the folder is a stand-in)
        _check_images(config, root)
    _check_inception(config)


#: scikit-learn's digits: the demo's images.
DIGITS_IMAGES = 1797
#: pytorch-fid's Inception weights, the file torch.hub caches (``mmfm.metrics.inception.FID_WEIGHTS_FILE``).
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"


def _check_images(config: dict, root: Path) -> None:
    """The image folder before any job: one subfolder per class, each holding at least one readable image, and
    enough images for ``gmm.k`` modes. Reads the folder listing only, and stops counting once the classes
    and ``k`` are covered, so that ImageNet's 1.28 M files cost a directory scan per class."""
    rows_per_image = 2 if config["shards"]["flip"] and config["gmm"].get("rows", "all") == "all" else 1
    k = int(config["gmm"]["k"])
    need = -(-k // rows_per_image) if any_gmm(config) else 0  # images for k rows
    what = (f"gmm.k: {k} modes need at least {k} rows to fit on, {need} images "
            f"({rows_per_image} row{'s' if rows_per_image > 1 else ''} per image)")
    if config["data"]["source"] == "digits":
        if need > DIGITS_IMAGES:
            raise ConfigError(f"{what}; the digits demo has {DIGITS_IMAGES}")
        return
    folder = Path(config["data"]["images"])
    folder = folder if folder.is_absolute() else root / folder
    classes = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ConfigError(f"data.images: {config['data']['images']} holds no class subfolders (one per class, "
                          "e.g. ImageNet train's n01440764/ ...)")
    from mmfm.data.images import EXTENSIONS, supported

    total = 0
    for d in classes:
        found, others = 0, []
        with os.scandir(d) as it:
            for entry in it:
                if entry.name.startswith(".") or not entry.is_file():
                    continue
                if supported(entry.name):
                    found += 1
                    if total + found >= need:
                        break
                elif len(others) < 3:
                    others.append(entry.name)
        if not found:
            seen = f" (it holds {', '.join(others)}{', ...' if len(others) == 3 else ''})" if others else ""
            raise ConfigError(f"data.images: class folder {d} holds no image{seen}; readable extensions: "
                              f"{' '.join(EXTENSIONS)}. Remove the folder or add its images")
        total += found
    if total < need:
        raise ConfigError(f"{what}; {config['data']['images']} holds {total}")


def image_folder_state(config: dict, root: str | Path = ".") -> str:
    """A digest of the image folder's class subfolders and their modification times (``""`` for the digits
    demo, whose images the workflow writes): the encode rule's parameter that reruns it when images are added
    to or removed from a class, which Snakemake's own check of the folder (its top level's time) misses.
    One ``stat`` per class; an image rewritten in place is not seen (touch its class folder)."""
    import hashlib

    if config["data"]["source"] == "digits":
        return ""
    folder = Path(config["data"]["images"])
    folder = folder if folder.is_absolute() else Path(root) / folder
    h = hashlib.sha256()
    try:
        with os.scandir(folder) as it:
            for entry in sorted((e for e in it if e.is_dir() and not e.name.startswith(".")), key=lambda e: e.name):
                h.update(f"{entry.name}\0{entry.stat().st_mtime_ns}\0".encode())
    except OSError:
        return ""  # a missing folder: the config check names it
    return h.hexdigest()[:16]


def _check_inception(config: dict) -> None:
    """``eval.metric: fid`` needs pytorch-fid's Inception weights: ``eval.inception`` or the torch hub cache
    (jobs never download)."""
    ev = config["eval"]
    if ev["metric"] != "fid" or ev.get("inception"):
        return
    hub = Path(os.environ.get("TORCH_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
               / "torch") / "hub" / "checkpoints" / FID_WEIGHTS_FILE
    if not hub.is_file():
        raise ConfigError(f"eval.inception: metric fid needs pytorch-fid's Inception weights; none given and "
                          f"{hub} does not exist. Download https://github.com/mseitzer/pytorch-fid/releases/"
                          f"download/fid_weights/{FID_WEIGHTS_FILE} there, or set eval.inception to the file")


def disk_warnings(config: dict, root: str | Path = ".") -> list[str]:
    """A warning when the results folder's file system has less free space than the latent shards alone will
    take (``rows x (N D + Dc) x bytes``, from the tokenizer's shapes; ``mmfm plan`` counts every output)."""
    import shutil

    try:
        from mmfm.plan.geometry import tokenizer_geometry

        geo = tokenizer_geometry(config["encoder"], root)
    except (ImportError, KeyError, ValueError):
        return []
    if config["data"]["source"] == "digits":
        images = DIGITS_IMAGES
    else:
        images = int(config["data"].get("num_images") or 0)
    rows = images * (2 if config["shards"]["flip"] else 1)
    itemsize = 2 if config["shards"]["dtype"] == "float16" else 4
    need = rows * (geo.num_tokens * geo.token_dim + geo.cls_dim) * itemsize
    where = Path(root) / results_dir(config)
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if need <= free:
        return []
    return [f"results_dir: {results_dir(config)} has {free / 1e9:.1f} GB free; the latent shards alone will take "
            f"{need / 1e9:.1f} GB ({rows} rows of {geo.num_tokens} x {geo.token_dim} {config['shards']['dtype']}); "
            "`mmfm plan` counts every output"]


def _check_train(config: dict, run: str) -> None:
    gmm = f"{results_dir(config)}/gmm"
    settings = with_gmm_files(train_settings(config, run), f"{gmm}/spatial.safetensors", f"{gmm}/cls.safetensors")
    settings = with_network_files(settings, config, run)
    try:
        from mmfm.train.config import TrainConfig
    except ImportError:  # Snakemake runs in an environment without torch: the train job checks it
        return
    try:
        TrainConfig.from_dict(settings)
    except ValueError as err:
        msg = str(err).removeprefix("train config: ")
        key = msg.split(":", 1)[0]
        where = f"runs.{run}" if key in RUN_TRAIN_KEYS or key in ("gmm", "cls_gmm") else f"runs.{run}.train"
        raise ConfigError(f"{where}: {msg}") from None


def run_method(config: dict, run: str) -> str:
    """A run's ``method`` (``fm`` when it gives none)."""
    return config["runs"][run].get("method") or DEFAULT_METHOD


#: Training keys that name another network: a run of the config (its EMA export is then an input of the train
#: job, so editing that run retrains this one) or an ``ema.safetensors`` export.
NETWORK_KEYS = ("gm_init", "dmf_init", "dmf_guide")


def network_inputs(config: dict, run: str) -> dict[str, str]:
    """``{key: run or export}`` of the networks ``run``'s training reads (:data:`NETWORK_KEYS`): GMFlow's
    ``gm_init``, DMF's ``dmf_init`` and ``dmf_guide``, which defaults, for ``ag-*`` guidance, to the
    ``sample.guide`` of the ``dmf_init`` run."""
    settings = train_settings(config, run)
    out = {k: settings[k] for k in NETWORK_KEYS if settings.get(k)}
    if settings.get("method") == "dmf" and settings.get("dmf_guidance", "none") != "none" and "dmf_guide" not in out:
        init = out.get("dmf_init")
        guide = sample_settings(config, init).get("guide") if init in config["runs"] else None
        if guide:
            out["dmf_guide"] = guide
    return out


def network_runs(config: dict, run: str) -> list[str]:
    """The runs whose EMA exports ``run``'s training reads (:func:`network_inputs` naming runs)."""
    return [v for v in network_inputs(config, run).values() if v in config["runs"]]


def with_network_files(settings: dict, config: dict, run: str, files: dict | None = None) -> dict:
    """``settings`` with each of :func:`network_inputs` as a file: ``files[key]`` when given (the train job's
    inputs), else the run's ``results/runs/<run>/ema.safetensors`` or the export path itself."""
    out = dict(settings)
    for key, net in network_inputs(config, run).items():
        out[key] = str(files[key]) if files and files.get(key) else \
            (f"{results_dir(config)}/runs/{net}/ema.safetensors" if net in config["runs"] else net)
    return out


def _check_method(config: dict, run: str, root: str | Path = ".") -> None:
    """What a run's method needs of the other sections: GMFlow's spherical GMM and its ``gm_init`` run; the GM
    samplers only for a GMFlow run."""
    method, runs = run_method(config, run), config["runs"]
    settings = train_settings(config, run)
    method_of = sample_settings(config, run).get("method") or "euler"
    chosen = [method_of] if isinstance(method_of, str) else list(method_of)
    gm = [m for m in chosen if m in GM_SAMPLERS]
    if gm and method != "gmflow":
        raise ConfigError(f"runs.{run}.sample.method: {gm[0]} samples a GMFlow network's mixture; this run has "
                          f"method {method!r} (set method: gmflow, or sample it with euler / heun / midpoint / "
                          "dopri5)")
    flowmap = [m for m in chosen if m in FLOWMAP_SAMPLERS]
    if flowmap and method != "dmf":
        raise ConfigError(f"runs.{run}.sample.method: {flowmap[0]} jumps with a DMF flow map; this run has method "
                          f"{method!r} (set method: dmf with train.dmf_init, or sample it with euler / heun / "
                          "midpoint / dopri5)")
    dfm = [m for m in chosen if m in DFM_SAMPLERS]
    if dfm and method != "dfm":
        raise ConfigError(f"runs.{run}.sample.method: {dfm[0]} samples a DFM network's stages; this run has method "
                          f"{method!r} (set method: dfm, or sample it with euler / heun / midpoint / dopri5)")
    if method == "dfm":
        other = [m for m in chosen if m not in DFM_SAMPLERS]
        if other:
            raise ConfigError(f"runs.{run}.sample.method: {other[0]} cannot sample a DFM network (it takes the "
                              "Laplacian stages, one time each); use dfm-euler")
        _check_dfm(config, run, settings, root)
    if method == "dmf":
        _check_dmf(config, run, settings)
    if method != "gmflow":
        return
    if runs[run]["source"] == "gmm" and (config.get("spatial") or {}).get("covariance", "spherical") != "spherical":
        raise ConfigError(f"spatial.covariance: the GMFlow run {run!r} needs a spherical spatial GMM (one variance "
                          "per mode: GM-ODE's Bayes moves and GM-SDE's kernel share one variance per row), not "
                          f"{config['spatial']['covariance']!r}")
    groups = settings.get("gm_groups")
    if groups:
        try:
            from mmfm.plan.geometry import tokenizer_geometry

            width = tokenizer_geometry(config["encoder"], root).token_dim
        except (ImportError, KeyError, ValueError, OSError):
            width = None  # the tokenizer's shapes are unknown here: the train job checks
        if width is not None and width % int(groups):
            raise ConfigError(f"runs.{run}.train.gm_groups: {groups} does not divide the token width {width} of "
                              f"the {config['encoder']['name']} tokenizer")
    init = settings.get("gm_init")
    if init is None:
        return
    if init == run:
        raise ConfigError(f"runs.{run}.train.gm_init: a run cannot initialize itself")
    if init in runs:
        theirs = train_settings(config, init)
        if run_method(config, init) != "fm":
            raise ConfigError(f"runs.{run}.train.gm_init: {init!r} is a {run_method(config, init)} run; the head is "
                              "replicated from a velocity network (method fm)")
        differ = [f"{k} {theirs.get(k)!r} vs {settings.get(k)!r}" for k in ("model", "model_overrides", "conditioning")
                  if theirs.get(k) != settings.get(k)]
        if differ:
            raise ConfigError(f"runs.{run}.train.gm_init: {init!r} is another network than this run "
                              f"({'; '.join(differ)}); its weights would not fit")
    elif not str(init).endswith(".safetensors"):
        raise ConfigError(f"runs.{run}.train.gm_init: {init!r} is neither a run ({list(runs)}) nor a .safetensors "
                          "export")


def dfm_stages(config: dict, run: str) -> int:
    """The stages of a DFM run's pyramid (``train.dfm_stages``, default 2); 1 for any other run."""
    if run_method(config, run) != "dfm":
        return 1
    return int(train_settings(config, run).get("dfm_stages", 2))


def _check_dfm(config: dict, run: str, settings: dict, root: str | Path = ".") -> None:
    """A DFM run's stages against the tokenizer's grid, its sample thresholds and ratio, and NFEs that give every
    stage a step (``dfm-euler`` skips the smaller ones of ``eval.nfe``, not the final one)."""
    stages = settings.get("dfm_stages", 2)
    if not (isinstance(stages, int) and not isinstance(stages, bool) and stages >= 1):
        return  # (the typed view names the key)
    smp = sample_settings(config, run)
    ratio = smp.get("dfm_ratio", 4.0)
    if not (isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and ratio > 0):
        raise ConfigError(f"runs.{run}.sample.dfm_ratio: expected a positive number, got {ratio!r}")
    if final_nfe(config) < stages:
        raise ConfigError(f"eval.final_nfe: {final_nfe(config)} network calls cannot give each of the {stages} stages of "
                          f"the DFM run {run!r} a step; give at least {stages}")
    try:
        from mmfm.flow.dfm import check_starts
        from mmfm.flow.pyramid import LaplacianPyramid
        from mmfm.plan.geometry import tokenizer_geometry

        grid = tokenizer_geometry(config["encoder"], root).grid
    except (ImportError, KeyError, ValueError, OSError):
        return  # no torch, or the tokenizer's shapes are unknown here: the train and sample jobs check
    most = LaplacianPyramid.max_stages(grid[0]) if grid[0] == grid[1] else 0
    if stages > most:
        raise ConfigError(f"runs.{run}.train.dfm_stages: {stages} stages need a square grid with a side divisible "
                          f"by 2^{stages - 1} = {2 ** (stages - 1)}; the {config['encoder']['name']} tokenizer's "
                          f"{grid[0]} x {grid[1]} grid allows at most {most}")
    if smp.get("dfm_starts") is not None:
        try:
            check_starts(smp["dfm_starts"], stages)
        except ValueError as err:
            raise ConfigError(f"runs.{run}.sample.{err}") from None


def _check_dmf(config: dict, run: str, settings: dict) -> None:
    """A DMF run's ``dmf_init``: a velocity run (method fm) of the same network, source, coupling and
    conditioning, or an export; and the guide its ``ag-*`` guidance needs."""
    runs, init = config["runs"], settings.get("dmf_init")
    key = f"runs.{run}.train.dmf_init"
    if init == run:
        raise ConfigError(f"{key}: a run cannot initialize itself")
    if init in runs:
        if run_method(config, init) != "fm":
            raise ConfigError(f"{key}: {init!r} is a {run_method(config, init)} run; a flow map is fine-tuned from a "
                              "velocity network (method fm)")
        theirs = train_settings(config, init)
        differ = [f"{k} {theirs.get(k)!r} vs {settings.get(k)!r}" for k in
                  ("model", "model_overrides", "source", "coupling", "conditioning") if theirs.get(k) != settings.get(k)]
        if differ:
            raise ConfigError(f"{key}: {init!r} differs from this run ({'; '.join(differ)}); the flow map inherits its "
                              "network, source, coupling and conditioning: give this run the same")
    elif init is not None and not str(init).endswith(".safetensors"):
        raise ConfigError(f"{key}: {init!r} is neither a run ({list(runs)}) nor a .safetensors export")
    guidance = settings.get("dmf_guidance", "none")
    guide = network_inputs(config, run).get("dmf_guide")
    if guidance != "none" and guide is None:
        raise ConfigError(f"runs.{run}.train.dmf_guide: dmf_guidance {guidance!r} needs an autoguide: name a run or an "
                          "export, or give the dmf_init run a sample.guide")
    if guide == run:
        raise ConfigError(f"runs.{run}.train.dmf_guide: a run cannot guide its own training")
    if guide in runs and runs[guide]["conditioning"] != runs[run]["conditioning"]:
        raise ConfigError(f"runs.{run}.train.dmf_guide: the guide run {guide!r} has conditioning "
                          f"{runs[guide]['conditioning']!r}, this run {runs[run]['conditioning']!r}; a guide takes "
                          "the main model's inputs")


# ------------------------------------------------------------------------------------------------ samplers

#: The samplers ``sample.method`` may name (the schema's enum; ``mmfm sample --method``).
SAMPLERS = ("euler", "heun", "midpoint", "dopri5", "gm-ode", "gm-sde", "flowmap", "flowmap-restart", "dfm-euler")


def _methods(section: dict | None) -> list:
    method = (section or {}).get("method")
    return ["euler"] if method is None else [method] if isinstance(method, str) else list(method)


def samplers(config: dict, run: str) -> list[str]:
    """The samplers of ``run``'s sample sets: ``sample.method`` (one name or a list; the run's own ``sample``
    over the shared one), the headline sampler first. Its sets give ``final.json`` and the runs table's final
    number; every sampler gives a curve over ``eval.nfe``."""
    own = config["runs"][run].get("sample") or {}
    return _methods(own if "method" in own else config.get("sample"))


def sampler_dir(config: dict, run: str, sampler: str) -> str:
    """Where a sampler's sets and NFE curve go below ``samples/<run>/`` and ``eval/<run>/``: ``""`` for the
    run's headline sampler (``samples/<run>/nfe-N.npz``, ``eval/<run>/nfe_curve.csv``), ``"<sampler>/"`` for
    the others (``samples/<run>/heun/nfe-N.npz``, ``eval/<run>/heun/nfe_curve.csv``)."""
    return "" if sampler == samplers(config, run)[0] else f"{sampler}/"


def sample_sets(config: dict, run: str, *, results: str | None = None,
                name: str | None = None) -> list[tuple[str, int, str]]:
    """Every sample set of ``run``, ``(sampler, nfe, stem)`` in sampler order (headline first), then NFE order;
    ``stem`` is the path without ``.npz`` / ``.png``, under ``results`` (default :func:`results_dir`).
    ``name``: the run as the paths spell it (``"{run}"`` for a rule's pattern)."""
    results = results_dir(config) if results is None else results
    name = run if name is None else name
    least = dfm_stages(config, run)  # dfm-euler gives each stage a step: the smaller NFEs are left out
    return [(s, n, f"{results}/samples/{name}/{sampler_dir(config, run, s)}nfe-{n}")
            for s in samplers(config, run) for n in nfes(config) if s not in DFM_SAMPLERS or n >= least]


def nfe_curve_files(config: dict, run: str, *, results: str | None = None,
                    name: str | None = None) -> dict[str, str]:
    """``{sampler: its NFE curve}`` of ``run`` (``eval/<run>/nfe_curve.csv`` for the headline sampler,
    ``eval/<run>/<sampler>/nfe_curve.csv`` for the others), in sampler order; arguments as :func:`sample_sets`."""
    results = results_dir(config) if results is None else results
    name = run if name is None else name
    return {s: f"{results}/eval/{name}/{sampler_dir(config, run, s)}nfe_curve.csv" for s in samplers(config, run)}


def sampler_groups(config: dict) -> dict[str, list[str]]:
    """The runs grouped by their samplers, one ``sample`` and one ``evaluate`` rule per group (a rule's outputs
    are patterns of its wildcards, so runs with other samplers, which write other files, need a rule of their own):
    ``{rule suffix: runs}``, ``""`` (the rules ``sample``, ``sample_nodes``, ``evaluate``) for the runs sampled
    with the shared ``sample.method``, ``"_<samplers>"`` for each other list (``sample_euler_heun``,
    ``evaluate_euler_heun``; hyphens as underscores). Config order; the shared group first."""
    shared = _methods(config.get("sample"))
    groups: dict[tuple, list[str]] = {}
    for run in run_names(config):  # (samplers, their sets): a DFM run leaves out the NFEs below its stage count
        sets = tuple((s, n) for s, n, _ in sample_sets(config, run))
        groups.setdefault((tuple(samplers(config, run)), sets), []).append(run)
    out: dict[str, list[str]] = {}
    for (key, _), runs in sorted(groups.items(), key=lambda kv: list(kv[0][0]) != shared):
        suffix = "" if list(key) == shared and "" not in out else "_" + "_".join(key).replace("-", "_")
        while suffix in out:  # (names of other samplers that join to the same words)
            suffix += "_"
        out[suffix] = runs
    return out


def _check_samplers(config: dict) -> None:
    """``sample.method`` (shared, or a run's own): one sampler or a non-empty list of distinct ones."""
    where = [("sample.method", config.get("sample"))]
    where += [(f"runs.{r}.sample.method", config["runs"][r].get("sample")) for r in run_names(config)]
    for key, section in where:
        if not section or "method" not in section or section["method"] is None:
            continue
        listed = _methods(section)
        if not listed:
            raise ConfigError(f"{key}: an empty list; give one sampler or a list of them ({', '.join(SAMPLERS)}), "
                              "the first being the headline sampler")
        twice = sorted({s for s in listed if listed.count(s) > 1})
        if twice:
            raise ConfigError(f"{key}: {', '.join(twice)} listed more than once in {listed}; each sampler gives one "
                              "curve")


#: Keys of a run's sample settings that belong to a method beyond flow matching (GMFlow, DMF, DFM): passed to
#: ``mmfm sample`` as flags by the sample job (:func:`method_flags`).
METHOD_SETTING_PREFIXES = ("gm_", "gm2_", "dmf_", "dfm_")


def method_flags(settings: dict, options: dict) -> tuple[list[str], list[str]]:
    """``(flags, left out)``: the sample settings whose keys start with :data:`METHOD_SETTING_PREFIXES` as
    ``mmfm sample`` flags (``gm_substeps: 4`` -> ``--gm-substeps 4``, a list as several values, ``None`` left
    out, a boolean as a bare flag or nothing for a flag that takes no value), for the flags ``options`` (the
    parser's ``{option string: argparse action}``) has; the keys of the others are ``left out``, so that a
    setting reaches ``mmfm sample`` only once its parser knows the flag."""
    flags, left_out = [], []
    for key in sorted(k for k in settings if k.startswith(METHOD_SETTING_PREFIXES) and settings[k] is not None):
        flag, value = "--" + key.replace("_", "-"), settings[key]
        action = options.get(flag)
        if action is None:
            left_out.append(key)
        elif action.nargs == 0:  # store_true / store_false
            flags += [flag] if value else []
        elif isinstance(value, (list, tuple)):
            flags += [flag, *map(str, value)]
        else:
            flags += [flag, str(value)]
    return flags, left_out
