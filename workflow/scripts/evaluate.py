"""evaluate: the distance of each of a run's sample sets to the data, one row per NFE, and the headline number.

metric fd: the samples (uint8 images, as saved) are encoded again by the tokenizer (normalized like the
shards) and their flattened token grids compared with those of the first eval.rows shard rows
(mmfm.train.evaluate.fd_of_images / reference_stats), the space the model was trained in.
metric fid: Inception FID against eval.reference (mmfm.metrics.inception.fid_from_samples).

Writes nfe_curve.csv (step, nfe, fd: the format of mmfm.train.evaluate.nfe_curve, whatever the metric)
and final.json ({"metric", <metric>, "nfe", "n", "step"}), each whole or not at all.
"""

import csv
import re
import faulthandler
import sys
from pathlib import Path

sys.stdout = sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821 (Snakemake's object)
faulthandler.enable(sys.stderr)  # a fatal signal (SIGBUS, SIGSEGV) leaves its traceback in the log


from mmfm import io  # noqa: E402
from mmfm.config import job_device  # noqa: E402
from mmfm.models.velocity import read_metadata  # noqa: E402
from mmfm.train.evaluate import FD_COLUMNS  # noqa: E402

sm = snakemake  # noqa: F821
ev, enc = sm.params.eval, sm.params.encoder
dev = job_device(sm)
step = int(read_metadata(sm.input.model).get("step", 0))
samples = {int(re.fullmatch(r"nfe-(\d+)\.npz", Path(p).name).group(1)): p for p in sm.input.samples}


def fd_in_tokenizer_space():
    from mmfm.config import tokenizer_kwargs
    from mmfm.encoders import load_tokenizer
    from mmfm.encoders.normalization import load_norm_stats
    from mmfm.train.evaluate import fd_of_images, reference_stats

    tokenizer = load_tokenizer(**tokenizer_kwargs(enc, dev))
    norm = load_norm_stats(enc["norm_stats"]) if enc.get("norm_stats") else None
    ref = reference_stats(list(sm.input.shards), ev["rows"])
    out = {}
    for nfe, path in sorted(samples.items()):
        out[nfe] = fd_of_images(path, tokenizer, ref, norm=norm, batch_size=ev["batch_size"], device=dev)
        print(f"NFE {nfe}: FD {out[nfe][0]:.5g} over {out[nfe][1]} samples")
    return out


def fid():
    from mmfm.metrics.inception import fid_from_samples

    out = {}
    for nfe, path in sorted(samples.items()):
        res = fid_from_samples(path, sm.input.reference, weights=sm.input.get("inception"),
                               batch_size=ev["batch_size"], device=dev, progress=True)
        out[nfe] = (res["fid"], res["n"])
        print(f"NFE {nfe}: FID {res['fid']:.5g} over {res['n']} samples")
    return out


values = fd_in_tokenizer_space() if ev["metric"] == "fd" else fid()
with io.atomic_path(sm.output.curve) as tmp, open(tmp, "w", newline="") as f:
    w = csv.DictWriter(f, FD_COLUMNS)
    w.writeheader()
    w.writerows({"step": step, "nfe": nfe, "fd": f"{v:.6g}"} for nfe, (v, _) in sorted(values.items()))
final = ev["final_nfe"] if ev.get("final_nfe") is not None else max(values)
io.write_json(sm.output.final, {"metric": ev["metric"], ev["metric"]: values[final][0], "nfe": final,
                                "n": values[final][1], "step": step})
