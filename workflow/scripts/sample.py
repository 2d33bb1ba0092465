"""sample: every sample set of a run, each sampler of its sample.method at each NFE of eval.nfe, through
`mmfm sample` (mmfm.cli.main, one call per set in this process: the job pays its start-up once), decoded to ADM
.npz + PNG grid; one process per GPU of the job, one agent per node for a `nodes > 1` run (per-sample seeds: the
same set either way).

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
from mmfm.cli import build_parser, main  # noqa: E402


def method_flags(settings: dict) -> list[str]:
    """The run's sample settings of a method beyond flow matching (keys gm_*, gm2_*, dmf_*, dfm_*) as `mmfm
    sample` flags (mmfm.config.method_flags: gm_substeps: 4 -> --gm-substeps 4, lists as several values, None
    left out), for the flags `mmfm sample`'s parser knows, read from mmfm.cli's parser in this process (`mmfm
    sample --help` in a subprocess would cost seconds); each other key is named in the log and left out. The
    GMFlow sampler's flags: --gm-substeps, --gm-order, --gm-guidance-scale, --gm-orthogonal,
    --gm-guidance-interval, --gm2-coefs."""
    if not any(k.startswith(mc.METHOD_SETTING_PREFIXES) for k in settings):
        return []
    flags, left_out = mc.method_flags(settings, _sample_options())
    for key in left_out:
        print(f"sample.{key}: `mmfm sample` has no --{key.replace('_', '-')}; left out", flush=True)
    return flags


def _sample_options() -> dict:
    """``{option string: argparse action}`` of `mmfm sample`."""
    parser = build_parser()
    for action in parser._actions:  # the subcommands
        if "sample" in (getattr(action, "choices", None) or {}):
            return {opt: a for a in action.choices["sample"]._actions for opt in a.option_strings}
    return {}


sm = snakemake  # noqa: F821
s, enc, run = sm.params.sample, sm.params.encoder, sm.wildcards.run
tok = mc.tokenizer_kwargs(enc, "cpu", sm.params.decoder)
common = ["--model", sm.input.model, "--source", sm.input.get("gmm", "gaussian"), "--num-samples", str(s["n"]),
          "--seed", str(s["seed"]), "--shift", str(s["shift"]), "--end", str(s["end"]),
          "--guidance-scale", str(s["guidance_scale"]), "--guidance-interval", *map(str, s["guidance_interval"]),
          "--cfg-scale", str(s["cfg_scale"]), "--batch-size", str(s["batch_size"]), "--encoder", tok["name"],
          "--precision", tok["precision"], "--network-precision", s.get("precision", "fp32"), "--json",
          *mc.launch_flags(dict(sm.resources.items()), sm.threads, sm.config.get("allow_cpu_fallback", False))]
for flag, value in (("--guide", sm.input.get("guide")), ("--encoder-path", tok.get("path")),
                    ("--image-size", tok.get("image_size")), ("--patch-size", tok.get("patch_size")),
                    ("--pool", tok.get("pool")), ("--decoder", tok.get("decoder")),
                    ("--norm-stats", enc.get("norm_stats"))):
    if value is not None:
        common += [flag, str(value)]
common += method_flags(s)

sets = mc.sample_sets(sm.config, run)  # (sampler, nfe, path stem): the rule's outputs, in the same order
outputs = list(zip(sm.output.npz, sm.output.grids))
if [(f"{stem}.npz", f"{stem}.png") for _, _, stem in sets] != outputs:
    sys.exit(f"sample {run}: the job's outputs {outputs} are not the sets of its samplers {sets}")
for sampler, nfe, stem in sets:
    argv = ["sample", "--out", f"{stem}.npz", "--grid", f"{stem}.png", "--method", sampler, "--steps", str(nfe),
            *common]
    print(f"[{sampler}, NFE {nfe}] mmfm " + " ".join(argv), flush=True)
    rc = main(argv)
    if rc:
        sys.exit(rc)
