# Stage 1: images -> tokenizer -> Parquet latent shards (a map: one job per shard).


rule encode:
    input:
        images=image_folder(),
    output:
        f"{RESULTS}/shards/shard-{{shard}}.parquet",
    params:
        encoder=config["encoder"],
        shards=config["shards"],
        images=lambda wildcards: mc.image_folder_state(config),  # images added to or removed from a class
    log:
        f"{LOGS}/encode/shard-{{shard}}.log",
    benchmark:
        f"{BENCH}/encode/shard-{{shard}}.tsv"
    threads: res("encode", "threads")
    resources:
        gpu=res("encode", "gpu"),
        mem_mb=res("encode", "mem_mb"),
        runtime=res("encode", "runtime"),
    conda:
        TORCH_ENV
    script:
        "../scripts/encode.py"
