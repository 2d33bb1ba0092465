# Paths and helpers shared by the rules. Every output lives under results/ (design.md §3):
#   results/digits/                      the demo's image folder
#   results/shards/shard-XXXX.parquet    latent shards
#   results/gmm/cls.safetensors          CLS GMM (+ .json, _weights.png)
#   results/gmm/partials/shard-XXXX.safetensors, results/gmm/spatial.safetensors
#   results/runs/{run}/                  checkpoints, metrics.csv, fd.csv, ema.safetensors
#   results/samples/{run}/nfe-{nfe}.npz  (+ .png grid)
#   results/eval/{run}/nfe_curve.csv, final.json
#   results/toy_r10/, results/report/, results/summary.json, results/logs/, results/benchmarks/

RESULTS = "results"
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
    return out


def sample_inputs(wildcards):
    out = {"model": ema_file(wildcards.run)}
    if mc.uses_gmm(config, wildcards.run):
        out["gmm"] = SPATIAL_GMM
    guide = mc.sample_settings(config, wildcards.run).get("guide")
    if guide is not None:
        out["guide"] = ema_file(guide) if guide in config["runs"] else guide
    return out


def evaluate_inputs(wildcards):
    out = {"samples": expand(f"{RESULTS}/samples/{wildcards.run}/nfe-{{nfe}}.npz", nfe=mc.nfes(config))}
    if config["eval"]["metric"] == "fd":
        out["shards"] = shard_files()
    else:
        out["reference"] = config["eval"]["reference"]
        if config["eval"].get("inception"):
            out["inception"] = config["eval"]["inception"]
    return out


def report_outputs():
    out = {
        "summary": f"{RESULTS}/summary.json",
        "table": report(f"{RESULTS}/report/summary.html", caption="../report/summary.rst", category="0. Summary"),
        "training": report(
            f"{RESULTS}/report/training_curves.png",
            caption="../report/training_curves.rst",
            category="2. Training",
        ),
        "nfe": report(
            f"{RESULTS}/report/nfe_curves.png", caption="../report/nfe_curves.rst", category="3. Sampling steps"
        ),
        "benchmarks": report(
            f"{RESULTS}/report/benchmarks.html",
            caption="../report/benchmarks.rst",
            category="6. Runtime and memory",
        ),
    }
    if mc.any_gmm(config):
        out["gmm_weights"] = report(
            f"{RESULTS}/report/gmm_weights.png", caption="../report/gmm_weights.rst", category="1. GMM source"
        )
    if config["toy_r10"]["enabled"]:
        out["r10_table"] = report(
            f"{RESULTS}/report/r10_table.html", caption="../report/r10_table.rst", category="5. R^10 toy"
        )
    return out


def report_inputs():
    runs = mc.evaluated_runs(config)
    out = {
        "models": [ema_file(r) for r in runs],
        "curves": expand(f"{RESULTS}/eval/{{run}}/nfe_curve.csv", run=runs),
        "finals": expand(f"{RESULTS}/eval/{{run}}/final.json", run=runs),
        "samples": expand(f"{RESULTS}/samples/{{run}}/nfe-{mc.final_nfe(config)}.npz", run=runs),
    }
    if mc.any_gmm(config):
        out["gmm"] = SPATIAL_GMM
    if config["toy_r10"]["enabled"]:
        out["toy"] = f"{RESULTS}/toy_r10/r10.json"
    return out
