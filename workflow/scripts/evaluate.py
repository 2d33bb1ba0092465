"""evaluate: the distance of each of a run's sample sets to the data, one NFE curve per sampler of its
sample.method, and the headline number (the headline sampler's, at eval.final_nfe).

metric fd: the samples (uint8 images, as saved) are encoded again by the tokenizer (normalized like the
shards) and their flattened token grids compared with those of the first eval.rows shard rows
(mmfm.train.evaluate.fd_of_images / reference_stats), the space the model was trained in.
metric fid: Inception FID against eval.reference (mmfm.metrics.inception.fid_from_samples).

Writes one nfe_curve.csv per sampler (step, nfe, fd: the format of mmfm.train.evaluate.nfe_curve, whatever
the metric; eval/<run>/nfe_curve.csv for the headline sampler, eval/<run>/<sampler>/nfe_curve.csv for another)
and final.json ({"metric", <metric>, "nfe", "n", "step"}), each whole or not at all.
"""

import csv
import faulthandler
import sys

sys.stdout = sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821 (Snakemake's object)
faulthandler.enable(sys.stderr)  # a fatal signal (SIGBUS, SIGSEGV) leaves its traceback in the log


import mmfm.config as mc  # noqa: E402
from mmfm import io  # noqa: E402
from mmfm.config import job_device  # noqa: E402
from mmfm.models.velocity import read_metadata  # noqa: E402
from mmfm.train.evaluate import FD_COLUMNS  # noqa: E402

sm = snakemake  # noqa: F821
ev, enc = sm.params.eval, sm.params.encoder
dev = job_device(sm)
step = int(read_metadata(sm.input.model).get("step", 0))
run = sm.wildcards.run
sets = mc.sample_sets(sm.config, run)  # (sampler, nfe, path stem): the rule's inputs, in the same order
curves = dict(zip(mc.samplers(sm.config, run), sm.output.curves))
if [f"{stem}.npz" for _, _, stem in sets] != list(sm.input.samples) or \
        list(curves.values()) != list(mc.nfe_curve_files(sm.config, run).values()):
    sys.exit(f"evaluate {run}: the job's files are not the sets of its samplers {sets}")
samples = {(sampler, nfe): f"{stem}.npz" for sampler, nfe, stem in sets}


def fd_in_tokenizer_space():
    from mmfm.config import tokenizer_kwargs
    from mmfm.encoders import load_tokenizer
    from mmfm.encoders.normalization import load_norm_stats
    from mmfm.train.evaluate import fd_of_images, reference_stats

    tokenizer = load_tokenizer(**tokenizer_kwargs(enc, dev))
    norm = load_norm_stats(enc["norm_stats"]) if enc.get("norm_stats") else None
    ref = reference_stats(list(sm.input.shards), ev["rows"])
    out = {}
    for (sampler, nfe), path in samples.items():
        out[sampler, nfe] = fd_of_images(path, tokenizer, ref, norm=norm, batch_size=ev["batch_size"], device=dev)
        print(f"{sampler}, NFE {nfe}: FD {out[sampler, nfe][0]:.5g} over {out[sampler, nfe][1]} samples")
    return out


def fid():
    from mmfm.metrics.inception import fid_from_samples

    out = {}
    for (sampler, nfe), path in samples.items():
        res = fid_from_samples(path, sm.input.reference, weights=sm.input.get("inception"),
                               batch_size=ev["batch_size"], device=dev, progress=True)
        out[sampler, nfe] = (res["fid"], res["n"])
        print(f"{sampler}, NFE {nfe}: FID {res['fid']:.5g} over {res['n']} samples")
    return out


values = fd_in_tokenizer_space() if ev["metric"] == "fd" else fid()
for sampler, path in curves.items():
    with io.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, FD_COLUMNS)
        w.writeheader()
        w.writerows({"step": step, "nfe": nfe, "fd": f"{v:.6g}"}
                    for (s, nfe), (v, _) in sorted(values.items()) if s == sampler)
headline, final = next(iter(curves)), mc.final_nfe(sm.config)
io.write_json(sm.output.final, {"metric": ev["metric"], ev["metric"]: values[headline, final][0], "nfe": final,
                                "n": values[headline, final][1], "step": step})
