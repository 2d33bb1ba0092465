# Stage 2: the Gaussian-mixture source (docs/method.md §3.2-3.3).
#   fit_cls_gmm:   a diagonal K-mode GMM on the CLS descriptors of all shards (EM on numpy, or CuPy/cuML on GPU);
#                  gmm.rows: originals leaves out the stored mirrors (the release fitted on the images alone)
#   spatial_stats: per group of shards (spatial.groups contiguous ranges; default one per shard), each row's
#                  hard CLS mode and float64 per-mode sums of its token grid (map); one partial per group,
#                  ~8 K N D bytes once a group touches every mode (mmfm.gmm.spatial.partial_bytes);
#                  spatial.rows_from: originals skips the stored mirrors, spatial.flip adds each latent's
#                  width-flip into its row's mode (both: the release's statistics)
#   spatial_gmm:   the partials of all groups -> per-mode means (K, N, D) and variances (reduce)


rule fit_cls_gmm:
    input:
        shards=shard_files(),
    output:
        gmm=CLS_GMM,
        sidecar=f"{RESULTS}/gmm/cls.json",
        weights=report(
            f"{RESULTS}/gmm/cls_weights.png",
            caption="../report/gmm_weights.rst",
            category="1. GMM source",
        ),
    params:
        gmm=config["gmm"],
    log:
        f"{LOGS}/fit_cls_gmm.log",
    benchmark:
        f"{BENCH}/fit_cls_gmm/all.tsv"
    threads: res("fit_cls_gmm", "threads")
    resources:
        gpu=res("fit_cls_gmm", "gpu"),
        mem_mb=res("fit_cls_gmm", "mem_mb"),
        runtime=res("fit_cls_gmm", "runtime"),
    conda:
        gmm_env("fit_cls_gmm")
    script:
        "../scripts/fit_cls_gmm.py"


rule spatial_stats:
    input:
        shards=group_shard_files,
        cls_gmm=CLS_GMM,
    output:
        f"{RESULTS}/gmm/partials/group-{{group}}.safetensors",
    wildcard_constraints:
        group=r"\d{4}",
    params:
        spatial=config["spatial"],
    log:
        f"{LOGS}/spatial_stats/group-{{group}}.log",
    benchmark:
        f"{BENCH}/spatial_stats/group-{{group}}.tsv"
    threads: res("spatial_stats", "threads")
    resources:
        gpu=res("spatial_stats", "gpu"),
        mem_mb=res("spatial_stats", "mem_mb"),
        runtime=res("spatial_stats", "runtime"),
    conda:
        TORCH_ENV
    script:
        "../scripts/spatial_stats.py"


rule spatial_gmm:
    input:
        partials=spatial_partials(),
    output:
        gmm=SPATIAL_GMM,
        sidecar=f"{RESULTS}/gmm/spatial.json",
    params:
        spatial=config["spatial"],
    log:
        f"{LOGS}/spatial_gmm.log",
    benchmark:
        f"{BENCH}/spatial_gmm/all.tsv"
    threads: res("spatial_gmm", "threads")
    resources:
        gpu=res("spatial_gmm", "gpu"),
        mem_mb=res("spatial_gmm", "mem_mb"),
        runtime=res("spatial_gmm", "runtime"),
    conda:
        TORCH_ENV
    script:
        "../scripts/spatial_gmm.py"
