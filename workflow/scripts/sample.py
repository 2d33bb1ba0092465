"""sample: one sample set of a run at one NFE through `mmfm sample` (mmfm.cli), decoded to ADM .npz + PNG grid;
one process per GPU of the job, one agent per node for a `nodes > 1` run (per-sample seeds: the same set
either way).

The export records its tokenizer, normalization and source; the config's encoder, decoder and GMM passed here
override the record, and `mmfm sample` stops before sampling, naming the file and both sides, where they
contradict it (another tokenizer, patch size, statistics, or a GMM of other shape)."""

import os
import sys

log = open(snakemake.log[0], "w", buffering=1)  # noqa: F821 (Snakemake's object)
os.dup2(log.fileno(), 1)  # the workers write here too
os.dup2(log.fileno(), 2)
sys.stdout = sys.stderr = log

import mmfm.config as mc  # noqa: E402
from mmfm.cli import main  # noqa: E402

sm = snakemake  # noqa: F821
s, enc = sm.params.sample, sm.params.encoder
tok = mc.tokenizer_kwargs(enc, "cpu", sm.params.decoder)
argv = ["sample", "--model", sm.input.model, "--out", sm.output.npz, "--grid", sm.output.grid,
        "--source", sm.input.get("gmm", "gaussian"), "--num-samples", str(s["n"]), "--seed", str(s["seed"]),
        "--steps", str(int(sm.wildcards.nfe)), "--method", s["method"], "--shift", str(s["shift"]),
        "--end", str(s["end"]), "--guidance-scale", str(s["guidance_scale"]),
        "--guidance-interval", *map(str, s["guidance_interval"]), "--cfg-scale", str(s["cfg_scale"]),
        "--batch-size", str(s["batch_size"]), "--encoder", tok["name"], "--precision", tok["precision"],
        "--network-precision", s.get("precision", "fp32"), "--json",
        *mc.launch_flags(dict(sm.resources.items()), sm.threads, sm.config.get("allow_cpu_fallback", False))]
for flag, value in (("--guide", sm.input.get("guide")), ("--encoder-path", tok.get("path")),
                    ("--image-size", tok.get("image_size")), ("--patch-size", tok.get("patch_size")),
                    ("--pool", tok.get("pool")), ("--decoder", tok.get("decoder")),
                    ("--norm-stats", enc.get("norm_stats"))):
    if value is not None:
        argv += [flag, str(value)]
print("mmfm " + " ".join(argv), flush=True)
sys.exit(main(argv))
