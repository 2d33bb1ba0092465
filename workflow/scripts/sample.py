"""sample: one sample set of a run at one NFE, decoded to ADM .npz + PNG grid (mmfm.sample.sample_run);
`gpu: N > 1` runs N processes via `mmfm sample --nproc` (per-sample seeds: the same set either way)."""

import subprocess
import sys

sys.stdout = sys.stderr = log = open(snakemake.log[0], "w", buffering=1)  # noqa: F821 (Snakemake's object)

from mmfm.config import device, tokenizer_kwargs  # noqa: E402

sm = snakemake  # noqa: F821
s, enc = sm.params.sample, sm.params.encoder
gpus, dev = int(sm.resources.gpu), device(sm.resources.gpu)
source, guide, steps = sm.input.get("gmm", "gaussian"), sm.input.get("guide"), int(sm.wildcards.nfe)

if gpus > 1:
    tok = tokenizer_kwargs(enc, dev, sm.params.decoder)
    cmd = [sys.executable, "-m", "mmfm.cli", "sample", "--model", sm.input.model, "--out", sm.output.npz,
           "--grid", sm.output.grid, "--source", source, "--num-samples", str(s["n"]), "--seed", str(s["seed"]),
           "--steps", str(steps), "--method", s["method"], "--shift", str(s["shift"]), "--end", str(s["end"]),
           "--guidance-scale", str(s["guidance_scale"]), "--guidance-interval", *map(str, s["guidance_interval"]),
           "--cfg-scale", str(s["cfg_scale"]), "--batch-size", str(s["batch_size"]), "--encoder", tok["name"],
           "--precision", tok["precision"], "--device", dev, "--nproc", str(gpus), "--json"]
    for flag, value in (("--guide", guide), ("--encoder-path", tok.get("path")), ("--image-size", tok.get("image_size")),
                        ("--patch-size", tok.get("patch_size")), ("--pool", tok.get("pool")),
                        ("--decoder", tok.get("decoder")), ("--norm-stats", enc.get("norm_stats"))):
        if value is not None:
            cmd += [flag, str(value)]
    print(" ".join(cmd))
    subprocess.run(cmd, stdout=log, stderr=log, check=True)
else:
    from mmfm.encoders import load_tokenizer
    from mmfm.encoders.normalization import load_norm_stats
    from mmfm.sample import sample_run

    res = sample_run(
        sm.input.model, sm.output.npz, load_tokenizer(**tokenizer_kwargs(enc, dev, sm.params.decoder)), source=source,
        n=s["n"], seed=s["seed"], steps=steps, method=s["method"], shift=s["shift"], end=s["end"], guide=guide,
        guidance_scale=s["guidance_scale"], guidance_interval=tuple(s["guidance_interval"]), cfg_scale=s["cfg_scale"],
        norm=load_norm_stats(enc["norm_stats"]) if enc.get("norm_stats") else None, batch_size=s["batch_size"],
        device=dev, grid=sm.output.grid, progress=True)
    print(res)
