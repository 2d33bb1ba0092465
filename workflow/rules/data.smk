# Stage 0: the images. The embedded demo writes scikit-learn's digits as a PNG class folder, read back
# by the same image-folder code that reads ImageNet.


rule export_digits:
    output:
        directory(f"{RESULTS}/digits"),
    params:
        data={k: v for k, v in config["data"].items() if k != "num_images"},  # num_images: for mmfm plan only
    log:
        f"{LOGS}/export_digits.log",
    benchmark:
        f"{BENCH}/export_digits/all.tsv"
    threads: res("export_digits", "threads")
    resources:
        gpu=res("export_digits", "gpu"),
        mem_mb=res("export_digits", "mem_mb"),
        runtime=res("export_digits", "runtime"),
    conda:
        TORCH_ENV
    script:
        "../scripts/export_digits.py"
