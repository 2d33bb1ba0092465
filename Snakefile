# MM-FM as a workflow (docs/design.md §3, §5): flow matching from a Gaussian mixture fitted to the data,
# with each image coupled to noise from its own mode.
#
#   images ──encode──▶ latent shards ──fit_cls_gmm──▶ CLS GMM ──spatial_stats / spatial_gmm──▶ spatial GMM
#                           │                                                                     │
#                           └──────────────▶ train (each run: source × coupling × conditioning) ◀─┘
#                                                  └──▶ sample (samplers × NFE) ──▶ evaluate ──▶ report
#   toy_r10: the paper's R^10 Compact/Spread table, beside the rest.
#
#   snakemake --cores 2                                   # the embedded digits demo (config.yaml)
#   snakemake --configfile workflow/presets/imagenet256-dinov2.yaml --profile profiles/slurm
#   results/index.html: the results page (mmfm report builds it from what exists); snakemake --report results/report.html
#   snakemake --cores 2 --configfile mine.yaml --config results_dir=results-mine   # beside the demo's results/

import re
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import min_version, update_config, validate

min_version("9.0")


# The embedded default sits beside this Snakefile. A --configfile (a preset, or an edited copy of
# config.yaml) replaces it instead of being merged into it, so the demo's runs do not leak into a
# preset's; --config key=value still overrides single keys of either.
if not workflow.overwrite_configfiles:

    configfile: str(Path(workflow.basedir) / "config.yaml")


try:
    import mmfm.config as mc
except ImportError:  # snakemake runs outside the project's environment: use the source tree
    import sys

    sys.path.insert(0, str(Path(workflow.basedir) / "src"))
    import mmfm.config as mc

SCHEMA = "workflow/schemas/config.schema.yaml"
if workflow.config_settings.overwrite_config:  # nested --config values arrive as strings
    update_config(config, mc.typed_overrides(workflow.config_settings.overwrite_config))
try:
    validate(config, SCHEMA)  # also fills in the schema's defaults
except WorkflowError:
    problems = mc.schema_errors(config, Path(workflow.basedir) / SCHEMA)
    raise WorkflowError("invalid config:\n  " + "\n  ".join(problems)) from None
try:
    mc.check(config)
except mc.ConfigError as err:
    raise WorkflowError(f"invalid config: {err}") from None
for warning in mc.disk_warnings(config):
    logger.warning(f"warning: {warning}")


report: "workflow/report/workflow.rst"


wildcard_constraints:
    run="|".join(map(re.escape, mc.run_names(config))),
    shard=r"\d{4}",
    nfe=r"\d+",


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/encode.smk"
include: "workflow/rules/gmm.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/toy.smk"
include: "workflow/rules/report.smk"


localrules:
    all,


rule all:
    input:
        f"{RESULTS}/summary.json",
    default_target: True
