"""``mmfm plan``: what a config's DAG will cost before anything runs, job by job, against its resources.

For every rule of the DAG (:mod:`mmfm.plan.dag`): the number of jobs, the bytes they write
(:mod:`mmfm.plan.artifacts`), the peak host memory per job (:mod:`mmfm.plan.host`), and for the jobs that run
networks on a GPU (encode, train, sample, evaluate) the GPU memory per rank, traced on fake tensors
(:mod:`mmfm.plan.train_memory`, :mod:`mmfm.plan.inference`), the FLOPs counted by ``FlopCounterMode``, and
the hours at a stated MFU of the GPU's dense peak (:mod:`mmfm.plan.gpus`). ``fit_cls_gmm`` on a GPU gets the
FLOPs of its EM and k-means matrix products (the GEMM sizes of :mod:`mmfm.gmm.em`), at ``max_iter``
iterations: an upper bound.

A job fits when its host memory is at most ``mem_mb`` (10^6 bytes per MB, Snakemake's reading), its GPU need
per rank (:func:`mmfm.plan.memory.gpu_need`) at most the GPU's memory, and its hours at most ``runtime``. A
training job may span several allocations: it resumes from its checkpoint on a retry, so it fits when the
allocations it needs (each ``runtime`` less the stop-signal lead and a restart) are at most the profile's
``retries + 1``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from mmfm import config as mc
from mmfm.plan import artifacts as art
from mmfm.plan import dag, host, load
from mmfm.plan import geometry as geom
from mmfm.plan.gpus import GPU
from mmfm.plan.load import PlanError

DEFAULT_MFU = 0.40
#: Minutes of an allocation a resumed training job loses besides the stop-signal lead (start-up, the
#: checkpoint read back, the first steps' compilation and warm-up).
RESTART_MINUTES = 5.0
DEFAULT_LEAD_SECONDS = 300
GPU_RULES = ("encode", "fit_cls_gmm", "train", "train_nodes", "sample", "sample_nodes", "evaluate")


@dataclass
class RulePlan:
    """The plan of one rule: its jobs and what they need (per job), against their resources."""

    rule: str
    jobs: int
    files: list[art.File] = field(default_factory=list)
    host_memory_bytes: int | None = None
    gpu_memory_bytes_per_rank: int | None = None
    flops: dict | None = None
    gpu_hours: float | None = None
    why: list[str] = field(default_factory=list)  # one line per job that does not fit
    notes: list[str] = field(default_factory=list)
    per_job: list[dict] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.why

    @property
    def bytes_written(self) -> int:
        return sum(f.total for f in self.files if not f.transient)

    @property
    def transient_bytes(self) -> int:
        return sum(f.total for f in self.files if f.transient)

    def as_dict(self) -> dict:
        return {"jobs": self.jobs, "bytes_written": self.bytes_written, "host_memory_bytes": self.host_memory_bytes,
                "gpu_memory_bytes_per_rank": self.gpu_memory_bytes_per_rank, "flops": self.flops,
                "gpu_hours": self.gpu_hours, "fits": self.fits, "why": self.why, "notes": self.notes,
                "transient_bytes": self.transient_bytes, "files": [f.as_dict() for f in self.files],
                "per_job": self.per_job}


@dataclass
class Plan:
    configfile: str
    gpu: GPU
    mfu: float
    mfu_source: str
    rules: dict[str, RulePlan]
    notes: list[str]
    images: int
    disk_free: int | None
    retries: int
    lead_seconds: int

    @property
    def total_bytes(self) -> int:
        return sum(r.bytes_written for r in self.rules.values())

    @property
    def peak_bytes(self) -> int:
        """Every job's files plus every transient file at once (all jobs of a rule running together)."""
        return self.total_bytes + sum(r.transient_bytes for r in self.rules.values())

    @property
    def total_gpu_hours(self) -> float:
        return sum(r.gpu_hours or 0.0 for r in self.rules.values())

    @property
    def disk_fits(self) -> bool:
        return self.disk_free is None or self.peak_bytes <= self.disk_free

    @property
    def fits(self) -> bool:
        return all(r.fits for r in self.rules.values()) and self.disk_fits

    def as_dict(self) -> dict:
        return {"rules": {name: r.as_dict() for name, r in self.rules.items()}, "total_bytes": self.total_bytes,
                "total_gpu_hours": self.total_gpu_hours, "peak_bytes": self.peak_bytes, "disk_free": self.disk_free,
                "disk_fits": self.disk_fits, "fits": self.fits, "configfile": self.configfile, "gpu": self.gpu.key,
                "gpu_memory_bytes": self.gpu.memory_bytes, "mfu": self.mfu, "mfu_source": self.mfu_source,
                "images": self.images, "retries": self.retries, "lead_seconds": self.lead_seconds,
                "notes": self.notes}


# ------------------------------------------------------------------------------------------------ helpers


def mfu_from(path: str | os.PathLike) -> tuple[float, str]:
    """The MFU ``mmfm bench train --json`` measured: the ``mfu`` of its JSON object (the last line)."""
    p = Path(path)
    if not p.is_file():
        raise PlanError(f"--mfu-from: {path}: no such file")
    lines = [ln for ln in p.read_text().splitlines() if ln.strip()]
    try:
        result = json.loads(lines[-1])
        mfu = result["mfu"]
    except (IndexError, ValueError, KeyError, TypeError):
        raise PlanError(f"--mfu-from: {path}: expected the JSON line of `mmfm bench train --json` (with 'mfu')") \
            from None
    if mfu is None or not 0 < float(mfu) <= 1:
        raise PlanError(f"--mfu-from: {path}: its mfu is {mfu!r} (measured on {result.get('device')!r}); "
                        "mmfm bench train reports an MFU only on a GPU of known peak")
    return float(mfu), f"measured by mmfm bench train on {result.get('device')} ({path})"


def read_profile(profile: str | os.PathLike | None) -> tuple[int, int, str]:
    """``(retries, stop-signal lead in seconds, where from)`` of a Snakemake profile's ``config.yaml``."""
    import yaml

    path = Path(profile) / "config.yaml" if profile else load.REPO / "profiles" / "slurm" / "config.yaml"
    if not path.is_file():
        if profile:
            raise PlanError(f"--profile: {path}: no such file")
        return 0, DEFAULT_LEAD_SECONDS, "no profile"
    cfg = yaml.safe_load(path.read_text()) or {}
    retries = int(cfg.get("retries", 0) or 0)
    lead = DEFAULT_LEAD_SECONDS
    extra = str(((cfg.get("set-resources") or {}).get("train") or {}).get("slurm_extra", ""))
    m = re.search(r"--signal=(?:B:)?\w+@(\d+)", extra)
    if m:
        lead = int(m.group(1))
    return retries, lead, str(path)


def parse_size(text: str, what: str = "size") -> int:
    """Bytes of a size such as ``2TB``, ``500 GB``, ``1.5e12`` (decimal units)."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtTpP]?)[bB]?\s*", str(text))
    try:
        value = float(m.group(1)) if m else None
    except ValueError:
        value = None
    if value is None or value < 0:
        raise PlanError(f"{what}: expected a size such as 2TB or 500GB, got {text!r}")
    return int(value * 1000 ** " KMGTP".index(m.group(2).upper() or " "))


def code_digest() -> str:
    """A digest of mmfm's source (the traces' cache key changes with any edit)."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    import torch

    h.update(torch.__version__.encode())
    return h.hexdigest()[:16]


class TraceCache:
    """Results of the fake-tensor traces, keyed by their arguments and :func:`code_digest`, in memory and (unless
    ``folder`` is None) as JSON files: a trace of DiTDH-XL takes a minute or two on a CPU."""

    def __init__(self, folder: str | os.PathLike | None):
        self.folder = Path(folder) if folder else None
        self.memo: dict[str, dict] = {}
        self._digest: str | None = None

    def get(self, kind: str, args: dict, compute):
        if self._digest is None:
            self._digest = code_digest()
        key = hashlib.sha256(json.dumps([kind, args, self._digest], sort_keys=True, default=str).encode()).hexdigest()
        if key in self.memo:
            return self.memo[key]
        path = self.folder / f"{kind}-{key[:24]}.json" if self.folder else None
        if path is not None and path.is_file():
            try:
                self.memo[key] = json.loads(path.read_text())
                return self.memo[key]
            except ValueError:
                pass
        out = compute()
        self.memo[key] = out
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                tmp.write_text(json.dumps(out))
                os.replace(tmp, path)
            except OSError:
                pass
        return out


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mmfm" / "plan"


def hours(flops: dict, precision: str, gpu: GPU, mfu: float, gpus: int = 1) -> float:
    """Wall hours of ``flops`` (``{"conv", "matmul"}``) on ``gpus`` GPUs at ``mfu`` of their dense peak."""
    seconds = sum(n / (mfu * gpu.peak(precision, kind)) for kind, n in flops.items())
    return seconds / max(1, gpus) / 3600.0


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def gb(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}" if n / size < 100 else f"{n / size:,.0f} {unit}"
    return f"{int(n)} B"


def _limit_mem(res: dict) -> int:
    return int(res["mem_mb"]) * 10**6


def _check_host(rp: RulePlan, what: str, need: int, res: dict) -> None:
    if need > _limit_mem(res):
        rp.why.append(f"{what}: host memory {gb(need)} > mem_mb {res['mem_mb']} ({gb(_limit_mem(res))})")


def _check_gpu(rp: RulePlan, what: str, need: int, peak: int, gpu: GPU) -> None:
    if need > gpu.memory_bytes:
        rp.why.append(f"{what}: GPU memory per rank {gib(need)} (tensors peak at {gib(peak)}, + 10 % "
                      f"fragmentation + 1 GiB CUDA context) > {gpu.key}'s {gib(gpu.memory_bytes)}")


def _check_runtime(rp: RulePlan, what: str, wall_h: float, res: dict) -> None:
    if wall_h * 60 > res["runtime"]:
        rp.why.append(f"{what}: runtime {wall_h:.1f} h > runtime {res['runtime']} min ({res['runtime'] / 60:.1f} h)")


# ------------------------------------------------------------------------------------------------ the plan


def merge_overrides(config: dict, overrides: dict) -> dict:
    """``config`` with ``overrides`` merged in, mappings key by key and anything else replaced (snakemake's
    ``--config``: ``runs={x: {evaluate: true}}`` changes one key of one run)."""
    out = dict(config)
    for key, value in overrides.items():
        out[key] = merge_overrides(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def build_plan(configfile: str | os.PathLike | None = None, *, gpu: GPU, mfu: float = DEFAULT_MFU,
               mfu_source: str = "the default", root: str | os.PathLike = ".", profile=None,
               disk: int | None = None, cache: str | os.PathLike | None = "default", train_memory=None,
               overrides: dict | None = None) -> Plan:
    """The plan of ``configfile`` (default: the ``config.yaml`` snakemake reads) on GPUs of kind ``gpu``.

    ``root``: the working directory (relative paths of the config). ``profile``: the Snakemake profile folder
    whose ``retries`` and training stop-signal lead apply (default ``profiles/slurm``). ``disk``: bytes free
    for ``results/`` (default: the free space of ``root``'s file system). ``cache``: where traces are kept
    (``"default"``: ``~/.cache/mmfm/plan``; ``None``: in memory only). ``train_memory``: the function that
    traces a training step (default :func:`mmfm.plan.train_memory.train_rank_memory`). ``overrides``: merged
    into the config file's mapping key by key, as snakemake's ``--config`` (:func:`merge_overrides`).
    """
    if not 0 < mfu <= 1:
        raise PlanError(f"--mfu: expected a fraction in (0, 1], got {mfu}")
    root = Path(root)
    configfile = Path(configfile) if configfile is not None else load.default_configfile(root)
    config, notes = load.validate(merge_overrides(load.read_configfile(configfile), overrides or {}), root)
    retries, lead, profile_path = read_profile(profile)
    if train_memory is None:
        from mmfm.plan.train_memory import train_rank_memory as train_memory
    traces = TraceCache(default_cache() if cache == "default" else cache)
    try:
        geo = geom.tokenizer_geometry(config["encoder"], root)
        data = geom.dataset(config, root)
    except ValueError as err:
        raise PlanError(str(err)) from None
    if data.note:
        notes.append(data.note)
    notes.append(f"tokenizer: {geo.name}, {geo.grid[0]}x{geo.grid[1]} tokens of width {geo.token_dim}, "
                 f"descriptor width {geo.cls_dim} (from {geo.source})")
    notes.append(f"training retries: {retries} (from {profile_path}); stop-signal lead {lead} s")
    k = int(config["gmm"]["k"])
    jobs = dag.jobs(config)
    params = traces.get("parameters", {"arch": geo.arch, "name": geo.name, "grid": geo.grid,
                                       "dim": geo.token_dim}, lambda: host.parameter_counts(geo))
    ctx = _Context(config, geo, data, gpu, mfu, k, retries, lead, traces, train_memory, params)
    rules: dict[str, RulePlan] = {}
    for rule, js in jobs.items():
        rp = RulePlan(rule, len(js))
        getattr(ctx, f"rule_{dag.stage(rule)}")(rp, js)
        rules[rule] = rp
    results = mc.results_dir(config)
    if results != "results":  # the files as the rules name them (the byte counts do not depend on it)
        for rp in rules.values():
            rp.files = [dataclasses.replace(f, path=results + f.path[len("results"):])
                        if f.path.startswith("results/") else f for f in rp.files]
    if disk is None:
        try:
            probe = root / results if (root / results).exists() else root
            disk = shutil.disk_usage(probe).free
            notes.append(f"disk: {gb(disk)} free on the file system of {probe.resolve()} (--disk to give another "
                         "figure)")
        except OSError:
            disk = None
    return Plan(str(configfile), gpu, mfu, mfu_source, rules, notes, data.count, disk, retries, lead)


class _Context:
    """What every rule's plan reads; one method per rule."""

    def __init__(self, config, geo, data, gpu, mfu, k, retries, lead, traces, train_memory, params):
        self.config, self.geo, self.data, self.gpu, self.mfu, self.k = config, geo, data, gpu, mfu, k
        self.retries, self.lead, self.traces, self.train_memory, self.params = retries, lead, traces, train_memory, \
            params

    # ---- the data stages

    def rule_export_digits(self, rp: RulePlan, js) -> None:
        rp.files = art.digits_folder()
        rp.host_memory_bytes = host.small("export_digits")
        _check_host(rp, "export_digits", rp.host_memory_bytes, js[0].resources)

    def rule_encode(self, rp: RulePlan, js) -> None:
        from mmfm.data.images import shard_range

        cfg, geo = self.config, self.geo
        rp.files = art.encode_files(cfg, geo, self.data)
        res = js[0].resources
        rp.host_memory_bytes = host.encode(cfg, geo, res["gpu"], self.params)
        _check_host(rp, "encode", rp.host_memory_bytes, res)
        if res["gpu"] < 1:
            return
        tr = self.traces.get("encode", _args(cfg, "encoder", "shards", geo=geo),
                             lambda: _encode_trace(cfg, geo))
        rp.gpu_memory_bytes_per_rank = tr["need_bytes"]
        _check_gpu(rp, "encode", tr["need_bytes"], tr["peak_bytes"], self.gpu)
        most = max(len(shard_range(self.data.count, s, cfg["shards"]["num_shards"])) for s in range(len(js)))
        per_image = tr["flops_per_sample"]
        wall = hours({k_: v * most for k_, v in per_image.items()}, tr["precision"], self.gpu, self.mfu)
        total = sum(per_image.values()) * self.data.count
        rp.flops = {"per_image": sum(per_image.values()), "total": total}
        rp.gpu_hours = hours({k_: v * self.data.count for k_, v in per_image.items()}, tr["precision"], self.gpu,
                             self.mfu) * res["gpu"]
        _check_runtime(rp, f"encode (a shard of {most:,} images, the encoder alone)", wall, res)
        rp.notes.append(f"encoder {tr['precision']}: {tr['peak_bytes'] / 2**30:.1f} GiB of tensors at batch "
                        f"{cfg['shards']['batch_size']}{' x 2 (flips)' if cfg['shards']['flip'] else ''}; hours count "
                        "the encoder only (JPEG decoding on the CPU workers often takes longer)")

    def rule_fit_cls_gmm(self, rp: RulePlan, js) -> None:
        cfg, geo, g = self.config, self.geo, self.config["gmm"]
        rp.files = art.cls_gmm_files(cfg, geo, self.data,
                                     plot=lambda k: self.traces.get("weights-plot", {"k": k}, lambda: art.weights_plot_bytes(k)))
        rows = art.counted_rows(cfg, self.data.count, g["rows"])
        res = js[0].resources
        rp.host_memory_bytes = host.fit_cls_gmm(cfg, geo, rows, res["gpu"])
        _check_host(rp, "fit_cls_gmm", rp.host_memory_bytes, res)
        if res["gpu"] < 1:
            return
        d, k = geo.cls_dim, self.k
        per_iter = 4 * rows * k * (2 * d + 1)  # the E-step and statistics GEMMs of mmfm.gmm.em
        init_rows = min(rows, g["init_sample"] or rows)
        kmeans = 2 * init_rows * k * d * (int(g["kmeans_iter"]) + 1)
        total = per_iter * int(g["max_iter"]) + kmeans
        precision = "fp32"  # CuPy's float32 GEMMs (float64 with gmm.precision float64: slower still)
        peak = self.gpu.fp32 if g["precision"] == "float32" else self.gpu.fp32 / 2
        wall = total / (self.mfu * peak) / 3600
        rp.flops = {"per_iteration": per_iter, "kmeans": kmeans, "total": total}
        rp.gpu_hours = wall * res["gpu"]
        covered = max(0, int((res["runtime"] / 60 * 3600 * self.mfu * peak - kmeans) // per_iter))
        if wall * 60 > res["runtime"]:
            rp.why.append(f"fit_cls_gmm: up to max_iter {g['max_iter']} EM iterations of {per_iter:.3g} FLOPs "
                          f"({precision} GEMMs) need up to {wall:.1f} h at {self.mfu:.0%} of {self.gpu.key}'s "
                          f"fp32 peak > runtime {res['runtime']} min, which covers {covered} iterations (EM stops "
                          f"earlier once the log-likelihood changes by < tol {g['tol']})")
        rp.notes.append("GPU memory of the CuPy EM is not traced; hours are an upper bound (max_iter iterations)")

    def rule_spatial_stats(self, rp: RulePlan, js) -> None:
        cfg, geo = self.config, self.geo
        rp.files = art.partial_files(cfg, geo, self.data)
        needs = []
        for job, group in zip(js, mc.spatial_groups(cfg)):
            counted, _ = art.group_rows(cfg, self.data, group)
            need = host.spatial_stats(cfg, geo, counted)
            needs.append(need)
            _check_host(rp, f"spatial_stats group {job.wildcards['group']}", need, job.resources)
        rp.host_memory_bytes = max(needs)

    def rule_spatial_gmm(self, rp: RulePlan, js) -> None:
        rp.files = art.spatial_gmm_files(self.config, self.geo, self.data)
        rp.host_memory_bytes = host.spatial_gmm(self.config, self.geo)
        _check_host(rp, "spatial_gmm", rp.host_memory_bytes, js[0].resources)

    # ---- training

    def train_trace(self, run: str, world: int) -> dict:
        settings = mc.train_settings(self.config, run)
        kw = {"num_tokens": self.geo.num_tokens, "token_dim": self.geo.token_dim, "cls_dim": self.geo.cls_dim,
              "num_modes": self.k, "world_size": world}
        name = getattr(self.train_memory, "__qualname__", "train_memory")
        return self.traces.get("train", {"settings": settings, **kw, "fn": name},
                               lambda: _jsonable(self.train_memory(settings, **kw)))

    def rule_train(self, rp: RulePlan, js) -> None:
        from mmfm.train.config import TrainConfig

        cfg, geo, gpu = self.config, self.geo, self.gpu
        needs, gpu_needs, total_hours, flops_total = [], [], 0.0, 0.0
        for job in js:
            run, res = job.run, job.resources
            settings = mc.with_gmm_files(mc.train_settings(cfg, run), "results/gmm/spatial.safetensors",
                                         "results/gmm/cls.safetensors")
            tc = TrainConfig.from_dict(settings)
            world = max(1, res["gpu"])
            rp.files += art.train_files(cfg, run, geo, world, self.data)
            nparams = _velocity_params(cfg, run, geo, self.k, self.traces)
            entry = {"run": run, "gpus": res["gpu"], "nodes": res["nodes"], "steps": tc.steps,
                     "parameters": nparams}
            from mmfm.train.schedule import derive_batch

            micro, accum = derive_batch(tc.global_batch, world, tc.micro_batch_max)
            need_host = host.train(cfg, run, geo, params=nparams, micro=micro, accumulation=accum)
            needs.append(need_host)
            entry.update(micro_batch=micro, accumulation=accum, host_memory_bytes=need_host)
            _check_host(rp, f"train {run}", need_host, res)
            if res["gpu"] >= 1:
                tr = self.train_trace(run, world)
                gpu_needs.append(tr["need_bytes"])
                precision = tc.precision
                wall = tc.steps * tr["flops_per_step"] / (self.mfu * gpu.peak(precision)) / 3600
                gpu_h = wall * res["gpu"]
                total_hours += gpu_h
                flops_total += tr["flops_per_step"] * world * tc.steps
                entry.update(gpu_memory_bytes_per_rank=tr["need_bytes"], gpu_peak_bytes=tr["peak_bytes"],
                             gpu_parts=tr.get("parts"), flops_per_step=tr["flops_per_step"] * world,
                             flops_per_step_per_rank=tr["flops_per_step"], flops_per_sample=tr["flops_per_sample"],
                             precision=precision, hours=wall, gpu_hours=gpu_h)
                _check_gpu(rp, f"train {run}", tr["need_bytes"], tr["peak_bytes"], gpu)
                usable = res["runtime"] - self.lead / 60 - RESTART_MINUTES
                allocations = math.ceil(wall * 60 / usable) if usable > 0 else math.inf
                entry["allocations"] = allocations
                if allocations > self.retries + 1:
                    rp.why.append(
                        f"train {run}: {wall:.1f} h of training ({tc.steps:,} steps x {tr['flops_per_step']:.3g} "
                        f"FLOPs per rank at {self.mfu:.0%} MFU) need {allocations} allocations of runtime "
                        f"{res['runtime']} min (each less the {self.lead} s stop lead and {RESTART_MINUTES:.0f} min "
                        f"of restart) > retries {self.retries} + 1; raise runtime or the profile's retries")
                elif allocations > 1:
                    rp.notes.append(f"train {run}: {wall:.1f} h in {allocations} allocations of {res['runtime']} min "
                                    f"(resumes from its checkpoint; retries {self.retries} allows {self.retries + 1})")
            rp.per_job.append(entry)
        rp.host_memory_bytes = max(needs)
        if gpu_needs:
            rp.gpu_memory_bytes_per_rank = max(gpu_needs)
            rp.gpu_hours = total_hours
            per_step = [e["flops_per_step"] for e in rp.per_job if "flops_per_step" in e]
            per_sample = [e["flops_per_sample"] for e in rp.per_job if "flops_per_sample" in e]
            rp.flops = {"per_step": max(per_step), "per_sample": max(per_sample), "total": flops_total}

    # ---- sampling and evaluation

    def rule_sample(self, rp: RulePlan, js) -> None:
        """One job per run: every sampler of its ``sample.method`` at every NFE (one ``per_job`` entry per set, the
        runtime check over the job's sets together)."""
        cfg, geo, gpu = self.config, self.geo, self.gpu
        needs, gpu_needs, total_hours, flops_total = [], [], 0.0, 0.0
        for job in js:
            run, res = job.run, job.resources
            world = max(1, res["gpu"])
            s = mc.sample_settings(cfg, run)
            for sampler, nfe, _ in mc.sample_sets(cfg, run):
                rp.files += art.sample_files(cfg, run, nfe, geo, world, sampler=sampler)
            guide = mc.guide_run(cfg, run)
            guided = s.get("guide") is not None and float(s.get("guidance_scale", 1.0)) != 1.0
            nv = _velocity_params(cfg, run, geo, self.k, self.traces)
            ng = _velocity_params(cfg, guide or run, geo, self.k, self.traces) if guided else 0
            need_host = host.sample(cfg, run, geo, velocity_params=nv, guide_params=ng, params=self.params)
            needs.append(need_host)
            _check_host(rp, f"sample {run}", need_host, res)
            job_hours, n = 0.0, int(s["n"])
            for sampler, nfe, _ in mc.sample_sets(cfg, run):
                entry = {"run": run, "sampler": sampler, "nfe": nfe, "gpus": res["gpu"], "n": n,
                         "host_memory_bytes": need_host}
                if res["gpu"] >= 1:
                    tr = self.traces.get("sample", {**_args(cfg, "encoder", "decoder", geo=geo),
                                                    "train": mc.train_settings(cfg, run),
                                                    "guide": mc.train_settings(cfg, guide) if guide else None,
                                                    "sample": s, "method": sampler, "k": self.k,
                                                    "cond": cfg["runs"][run]["conditioning"]},
                                         lambda run=run, sampler=sampler: _jsonable(
                                             _sample_trace(cfg, run, geo, self.k, sampler)))
                    # FLOPs: the solver's per-step cost x nfe steps, the decoder once
                    split = tr["flops_split"]
                    vel = {k_: v * nfe for k_, v in split["velocity_per_step"].items()}
                    dec = split["decoder"]
                    prec = tr["precision"]
                    wall = (hours({k_: v * n for k_, v in vel.items()}, prec["velocity"], gpu, self.mfu, world)
                            + hours({k_: v * n for k_, v in dec.items()}, prec["decoder"], gpu, self.mfu, world))
                    per_sample = sum(vel.values()) + sum(dec.values())
                    total_hours += wall * res["gpu"]
                    job_hours += wall
                    flops_total += per_sample * n
                    gpu_needs.append(tr["need_bytes"])
                    entry.update(gpu_memory_bytes_per_rank=tr["need_bytes"], gpu_peak_bytes=tr["peak_bytes"],
                                 gpu_parts=tr["parts"], flops_per_sample=per_sample, precision=prec, hours=wall,
                                 gpu_hours=wall * res["gpu"])
                    _check_gpu(rp, f"sample {run} {sampler} nfe {nfe}", tr["need_bytes"], tr["peak_bytes"], gpu)
                rp.per_job.append(entry)
            if res["gpu"] >= 1:
                sets = len(mc.sample_sets(cfg, run))
                _check_runtime(rp, f"sample {run} ({sets} set{'s' if sets > 1 else ''} of {n:,} samples on {world} "
                               "GPU(s))", job_hours, res)
        rp.host_memory_bytes = max(needs)
        if gpu_needs:
            rp.gpu_memory_bytes_per_rank = max(gpu_needs)
            rp.gpu_hours = total_hours
            rp.flops = {"per_sample": max(e["flops_per_sample"] for e in rp.per_job if "flops_per_sample" in e),
                        "total": flops_total}
            precisions = {json.dumps(e["precision"], sort_keys=True) for e in rp.per_job if "precision" in e}
            for p in precisions:
                pr = json.loads(p)
                rp.notes.append(f"velocity network in {pr['velocity']} (sample.precision), decoder in "
                                f"{pr['decoder']} (encoder.precision); fp32 matrix products run at "
                                f"{gpu.fp32 / 1e12:g} TFLOP/s on {gpu.key}, bf16 at {gpu.bf16 / 1e12:g}")

    def rule_evaluate(self, rp: RulePlan, js) -> None:
        cfg, geo, gpu = self.config, self.geo, self.gpu
        ev = cfg["eval"]
        for job in js:
            rp.files += art.evaluate_files(cfg, job.run)
        res = js[0].resources
        rp.host_memory_bytes = host.evaluate(cfg, geo, res["gpu"], self.params)
        for job in js:
            _check_host(rp, f"evaluate {job.run}", rp.host_memory_bytes, job.resources)
        if ev["metric"] == "fd" and geo.num_tokens * geo.token_dim > 65536:
            rp.notes.append(f"eval.metric fd: a Fréchet distance over N D = {geo.num_tokens * geo.token_dim:,} "
                            "features holds covariances of (N D)^2 float64: use metric fid")
        if res["gpu"] < 1:
            return
        tr = self.traces.get("evaluate", _args(cfg, "encoder", "eval", geo=geo),
                             lambda: _jsonable(_evaluate_trace(cfg, geo)))
        rp.gpu_memory_bytes_per_rank = tr["need_bytes"]
        _check_gpu(rp, "evaluate", tr["need_bytes"], tr["peak_bytes"], gpu)
        total_hours, flops_total = 0.0, 0.0
        for job in js:
            n = int(mc.sample_settings(cfg, job.run)["n"]) * len(mc.sample_sets(cfg, job.run))  # samplers x NFEs
            f = {k_: v * n for k_, v in tr["flops_per_sample"].items()}
            wall = hours(f, tr["precision"], gpu, self.mfu)
            total_hours += wall * res["gpu"]
            flops_total += sum(f.values())
            rp.per_job.append({"run": job.run, "images": n, "hours": wall})
            _check_runtime(rp, f"evaluate {job.run} ({n:,} images)", wall, job.resources)
        rp.gpu_hours = total_hours
        rp.flops = {"per_sample": sum(tr["flops_per_sample"].values()), "total": flops_total}

    def rule_toy_r10(self, rp: RulePlan, js) -> None:
        rp.files = art.toy_files()
        rp.host_memory_bytes = host.small("toy_r10")
        _check_host(rp, "toy_r10", rp.host_memory_bytes, js[0].resources)

    def rule_report(self, rp: RulePlan, js) -> None:
        rp.files = art.report_files(self.config, self.geo)
        rp.host_memory_bytes = host.small("report")
        _check_host(rp, "report", rp.host_memory_bytes, js[0].resources)

    def rule_all(self, rp: RulePlan, js) -> None:
        rp.notes.append("the target rule (local, no job of its own)")


def _args(config: dict, *sections: str, geo=None) -> dict:
    out = {s: config.get(s) for s in sections}
    if geo is not None:
        out["geo"] = {"name": geo.name, "grid": geo.grid, "dim": geo.token_dim, "arch": geo.arch,
                      "image_size": geo.image_size}
    return out


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _encode_trace(config, geo):
    from mmfm.plan.inference import encode_memory

    return _jsonable(encode_memory(config, geo))


def _sample_trace(config, run, geo, k, method=None):
    from mmfm.plan.inference import sample_rank_memory

    return sample_rank_memory(config, run, geo, k, nfe=1, method=method)


def _evaluate_trace(config, geo):
    from mmfm.plan.inference import evaluate_memory

    return evaluate_memory(config, geo)


def _velocity_params(config, run, geo, k, traces) -> int:
    """Parameters of ``run``'s velocity network (built on the ``meta`` device)."""
    def count():
        from mmfm.plan.inference import velocity_network

        return sum(t.numel() for t in velocity_network(config, run, geo, k).state_dict().values())

    return traces.get("velocity-params", {"train": mc.train_settings(config, run), "k": k, "n": geo.num_tokens,
                                          "d": geo.token_dim}, count)


# ------------------------------------------------------------------------------------------------ output


def _flops_cell(rule: str, flops: dict | None) -> str:
    if not flops:
        return "-"
    for key, unit in (("per_step", "step"), ("per_sample", "sample"), ("per_image", "image"),
                      ("per_iteration", "EM iter")):
        if key in flops:
            return f"{flops[key]:.3g}/{unit}"
    return f"{flops['total']:.3g}"


def render(plan: Plan) -> list[str]:
    """The plan as text: a header, the notes, one row per rule, what does not fit; the last two lines are
    the total disk and the total GPU-hours."""
    g = plan.gpu
    title = (f"mmfm plan: {plan.configfile} on {g.key} ({gib(g.memory_bytes)}; dense peak {g.bf16 / 1e12:g} "
             f"TFLOP/s bf16, {g.tf32 / 1e12:g} tf32, {g.fp32 / 1e12:g} fp32), MFU {plan.mfu:.0%} ({plan.mfu_source})")
    out = [title, f"images: {plan.images:,}"]
    notes = plan.notes + [f"{name}: {n}" for name, r in plan.rules.items() for n in r.notes]
    out += [f"  note: {n}" for n in notes]
    head = f"{'rule':<14}{'jobs':>6}  {'writes':>10}  {'host/job':>9}  {'GPU/rank':>9}  {'FLOPs':>16}  " \
           f"{'GPU-h':>9}  fits"
    out += ["", head, "-" * len(head)]
    for name, r in plan.rules.items():
        out.append(f"{name:<14}{r.jobs:>6}  {gb(r.bytes_written) if r.files else '-':>10}  "
                   f"{gb(r.host_memory_bytes) if r.host_memory_bytes else '-':>9}  "
                   f"{gib(r.gpu_memory_bytes_per_rank) if r.gpu_memory_bytes_per_rank else '-':>9}  "
                   f"{_flops_cell(name, r.flops):>16}  "
                   f"{f'{r.gpu_hours:,.1f}' if r.gpu_hours is not None else '-':>9}  {'yes' if r.fits else 'NO'}")
    why = [w for r in plan.rules.values() for w in r.why]
    if not plan.disk_fits:
        why.append(f"disk: {gb(plan.peak_bytes)} at the peak > {gb(plan.disk_free)} free")
    out.append("")
    out += (["does not fit:"] + [f"  {w}" for w in why]) if why else ["every job fits its resources"]
    free = f", {gb(plan.disk_free)} free" if plan.disk_free is not None else ""
    out.append(f"total disk: {gb(plan.total_bytes)} written ({gb(plan.peak_bytes)} at the peak, with every "
               f"transient file at once{free})")
    out.append(f"total GPU-hours: {plan.total_gpu_hours:,.1f} at {plan.mfu:.0%} MFU on {g.key}")
    return out
