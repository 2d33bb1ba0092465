"""encode: one shard of the image folder through the tokenizer into Parquet (mmfm.data.encode.encode_folder)."""

import faulthandler
import sys

sys.stdout = sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821 (Snakemake's object)
faulthandler.enable(sys.stderr)  # a fatal signal (SIGBUS, SIGSEGV) leaves its traceback in the log

from mmfm.config import job_device, tokenizer_kwargs  # noqa: E402
from mmfm.data.encode import encode_folder  # noqa: E402
from mmfm.encoders import load_tokenizer  # noqa: E402
from mmfm.encoders.normalization import load_norm_stats  # noqa: E402

sm = snakemake  # noqa: F821
enc, sh = sm.params.encoder, sm.params.shards
dev = job_device(sm)
norm = load_norm_stats(enc["norm_stats"]) if enc.get("norm_stats") else None
meta = encode_folder(
    sm.input.images, sm.output[0], load_tokenizer(**tokenizer_kwargs(enc, dev)),
    shard=int(sm.wildcards.shard), num_shards=sh["num_shards"], flip=sh["flip"], norm=norm, dtype=sh["dtype"],
    batch_size=sh["batch_size"], num_workers=sh["workers"], device=dev, on_bad_image=sh["on_bad_image"],
    min_side=sh["min_side"], row_group_rows=sh["row_group_rows"], progress=True)
bad = meta.get("bad_images") or {}
print({k: meta.get(k) for k in ("rows", "grid", "token_dim", "cls_dim", "seconds")},
      f"{bad.get('count', 0)} bad image(s) skipped" + "".join(f"\n  {b['path']}: {b['reason']}"
                                                          for b in bad.get("examples", [])))
