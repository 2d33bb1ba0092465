# Paths and helpers shared by the rules. Every output lives under results_dir (default results/; docs/design.md §3):
#   results/digits/                      the demo's image folder
#   results/shards/shard-XXXX.parquet    latent shards
#   results/gmm/cls.safetensors          CLS GMM (+ .json, _weights.png)
#   results/gmm/partials/group-XXXX.safetensors, results/gmm/spatial.safetensors
#   results/runs/{run}/                  checkpoints, metrics.csv, fd.csv, ema.safetensors
#   results/samples/{run}/nfe-{nfe}.npz  (+ .png grid; another sampler S than the headline one: {run}/S/nfe-{nfe})
#   results/eval/{run}/nfe_curve.csv, final.json  (another sampler S: {run}/S/nfe_curve.csv)
#   results/toy_r10/, results/report/, results/summary.json, results/logs/, results/benchmarks/

RESULTS = mc.results_dir(config)
LOGS = f"{RESULTS}/logs"
BENCH = f"{RESULTS}/benchmarks"
CLS_GMM = f"{RESULTS}/gmm/cls.safetensors"
SPATIAL_GMM = f"{RESULTS}/gmm/spatial.safetensors"
TORCH_ENV = "../../envs/torch.yaml"
RAPIDS_ENV = "../../envs/rapids.yaml"


def shard_ids():
    return [f"{i:04d}" for i in range(config["shards"]["num_shards"])]


def shard_files():
    return expand(f"{RESULTS}/shards/shard-{{shard}}.parquet", shard=shard_ids())


def spatial_groups():
    """The shards of each spatial_stats job: spatial.groups contiguous ranges (null: one per shard)."""
    return mc.spatial_groups(config)


def group_ids():
    return [f"{i:04d}" for i in range(len(spatial_groups()))]


def group_shard_files(wildcards):
    """The shard files of the spatial_stats job `wildcards.group`."""
    return [f"{RESULTS}/shards/shard-{i:04d}.parquet" for i in spatial_groups()[int(wildcards.group)]]


def spatial_partials():
    return expand(f"{RESULTS}/gmm/partials/group-{{group}}.safetensors", group=group_ids())


def image_folder():
    """The class folder the encoder reads: the exported digits, or data.images."""
    return f"{RESULTS}/digits" if mc.digits(config) else config["data"]["images"]


def ema_file(run):
    return f"{RESULTS}/runs/{run}/ema.safetensors"


def res(stage, key, per_run=False):
    """One resource of a stage from the config; ``per_run``: the job's run may override it (train, sample)."""
    if not per_run:
        return mc.resources(config, stage)[key]
    return lambda wildcards: mc.resources(config, stage, wildcards.run)[key]


def runs_pattern(runs):
    return "|".join(map(re.escape, runs)) or "(?!)"  # (?!) matches nothing


def runs_on_one_node(stage, among=None):
    """The runs (of `among`, default all) whose `stage` job (train, sample) runs on one node, as a wildcard
    pattern."""
    many = set(mc.multi_node_runs(config, stage))
    return runs_pattern([r for r in (mc.run_names(config) if among is None else among) if r not in many])


def runs_on_nodes(stage, among=None):
    """The runs (of `among`, default all) whose `stage` job spans several nodes (`nodes > 1` in their resources)."""
    return runs_pattern([r for r in mc.multi_node_runs(config, stage) if among is None or r in among])


def one_node_resources(stage):
    """Resources of a job of one node whose run may override them (train, sample)."""
    return {key: res(stage, key, per_run=True) for key in ("gpu", "mem_mb", "runtime")}


def as_base_rule(base, suffix, resources):
    """`resources` of the sample / evaluate rules of runs with samplers of their own (`suffix`, e.g.
    sample_euler_heun), with the profile's set-resources of the base rule (sample, sample_nodes, evaluate) over
    them, as Snakemake puts a profile's set-resources over a rule's own. A profile (profiles/slurm) names the
    base rules only (partitions, CPUs per GPU, slurm_extra). The base rules get theirs from Snakemake (suffix "")."""
    # (no line here may hold the word rule, then a colon: snakemake --lint takes that for a rule)
    given = workflow.resource_settings.overwrite_resources.get(base, {}) if suffix else {}
    return {**resources, **{k: getattr(v, "raw", v) for k, v in given.items()}}


def threads_as_base_rule(base, suffix, threads):
    """`threads`, or the profile's set-threads of the base rule (as_base_rule)."""
    given = workflow.resource_settings.overwrite_threads.get(base) if suffix else None
    return threads if given is None else getattr(given, "raw", given)


def node_resources(stage):
    """Resources of a job over several nodes, as the SLURM executor reads them: `nodes` nodes and as many
    tasks (`mpi` keeps the executor from wrapping the job in a one-task srun; the script starts the tasks
    itself), each task with the node's GPUs (`gres`, per node), threads (`cpus_per_task`) and memory."""
    r = lambda key: lambda wildcards: mc.resources(config, stage, wildcards.run)[key]  # noqa: E731
    gpn = r("gpus_per_node")
    return {
        "nodes": r("nodes"),
        "tasks": r("nodes"),
        "mpi": "srun",
        "gres": lambda wildcards: f"gpu:{gpn(wildcards)}" if gpn(wildcards) > 0 else "",
        "tasks_per_gpu": 0,  # else the executor turns `tasks` into --ntasks-per-gpu for a GPU job
        "cpus_per_task": r("threads"),
        "mem_mb": r("mem_mb"),
        "runtime": r("runtime"),
    }


# ---- inputs and outputs of the stages


def gmm_env(stage):
    """The RAPIDS environment (CuPy EM, cuML k-means) where the stage gets a GPU, else the torch one."""
    return RAPIDS_ENV if mc.resources(config, stage)["gpu"] > 0 else TORCH_ENV


def train_inputs(wildcards):
    spec = config["runs"][wildcards.run]
    out = {"shards": shard_files()}
    if spec["source"] == "gmm":
        out["gmm"] = SPATIAL_GMM
        if spec["coupling"].startswith("mode"):
            out["cls_gmm"] = CLS_GMM
    for key, net in mc.network_inputs(config, wildcards.run).items():  # gm_init, dmf_init, dmf_guide
        out[key] = ema_file(net) if net in config["runs"] else net
    return out


def sample_inputs(wildcards):
    out = {"model": ema_file(wildcards.run)}
    if mc.uses_gmm(config, wildcards.run):
        out["gmm"] = SPATIAL_GMM
    guide = mc.sample_settings(config, wildcards.run).get("guide")
    if guide is not None:
        out["guide"] = ema_file(guide) if guide in config["runs"] else guide
    return out


# The runs grouped by their samplers (sample.method): one sample and one evaluate rule per group (sample.smk).
SAMPLER_GROUPS = mc.sampler_groups(config)


def sample_outputs(run):
    """The outputs of `run`'s sample job, as patterns of {run} (the same for every run of its group): every
    sampler's set at every NFE (mmfm.config.sample_sets: the headline sampler's samples/{run}/nfe-N.npz, another
    one's samples/{run}/S/nfe-N.npz), the .npz files and their grids in the same order."""
    sets = mc.sample_sets(config, run, name="{run}")
    grids = [report(f"{stem}.png", caption="../report/samples.rst", category="4. Samples", subcategory="{run}",
                    labels={"run": "{run}", "NFE": str(nfe), "sampler": sampler})
             for sampler, nfe, stem in sets]
    return {"npz": [f"{stem}.npz" for _, _, stem in sets], "grids": grids}


def evaluate_outputs(run):
    """One NFE curve per sampler (the headline sampler's first) and final.json, as patterns of {run}."""
    return {"curves": list(mc.nfe_curve_files(config, run, name="{run}").values()),
            "final": f"{RESULTS}/eval/{{run}}/final.json"}


def evaluate_inputs(wildcards):
    out = {"samples": [f"{stem}.npz" for _, _, stem in mc.sample_sets(config, wildcards.run)]}
    if config["eval"]["metric"] == "fd":
        out["shards"] = shard_files()
    else:
        out["reference"] = config["eval"]["reference"]
        if config["eval"].get("inception"):
            out["inception"] = config["eval"]["inception"]
    return out


def report_outputs():
    """summary.json, the results page (index.html; report/page.html is the same page with its images inlined,
    for `snakemake --report`) and its figures (mmfm.page)."""
    fig = lambda name, caption, category: report(  # noqa: E731
        f"{RESULTS}/report/{name}", caption=f"../report/{caption}", category=category
    )
    out = {
        "summary": f"{RESULTS}/summary.json",
        "page": f"{RESULTS}/index.html",
        "inline": fig("page.html", "page.rst", "0. Results page"),
        "loss": fig("loss.png", "loss.rst", "2. Training"),
        "fd_nfe": fig("fd_nfe.png", "fd_nfe.rst", "3. Sampling steps"),
        "data": fig("data.png", "data.rst", "4. Samples"),
    }
    if any(mc.train_settings(config, r).get("eval_every") for r in mc.evaluated_runs(config)):
        out["fd_training"] = fig("fd_training.png", "fd_training.rst", "2. Training")
    if mc.any_gmm(config):
        out["em"] = fig("gmm_loglik.png", "gmm_loglik.rst", "1. GMM source")
        out["weights"] = fig("gmm_weights.png", "gmm_weights.rst", "1. GMM source")
        out["mode_means"] = fig("mode_means.png", "mode_means.rst", "1. GMM source")
    return out


def report_inputs():
    runs = mc.evaluated_runs(config)
    out = {
        "models": [ema_file(r) for r in runs],
        "curves": [p for r in runs for p in mc.nfe_curve_files(config, r).values()],
        "finals": expand(f"{RESULTS}/eval/{{run}}/final.json", run=runs),
        "grids": [f"{stem}.png" for r in runs for _, _, stem in mc.sample_sets(config, r)],
        "shards": shard_files(),  # their metadata (images, bad images), the data grid and the distance's floor
    }
    if mc.any_gmm(config):
        out["gmm"] = SPATIAL_GMM
        out["cls_gmm"] = CLS_GMM
    if config["toy_r10"]["enabled"]:
        out["toy"] = f"{RESULTS}/toy_r10/r10.json"
        out["toy_plot"] = f"{RESULTS}/toy_r10/r10.png"
    return out
