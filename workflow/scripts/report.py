"""report: results/summary.json and the report's tables and figures (mmfm.report)."""

import faulthandler
import sys
from pathlib import Path

sys.stdout = sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821 (Snakemake's object)
faulthandler.enable(sys.stderr)  # a fatal signal (SIGBUS, SIGSEGV) leaves its traceback in the log

from mmfm import report  # noqa: E402

sm = snakemake  # noqa: F821
p, out = sm.params, sm.output
runs = {name: {"run_dir": Path(model).parent, "samples": samples, "nfe_curve": curve, "metric": p.metric,
               "final": final}
        for name, model, curve, final, samples in zip(p.runs, sm.input.models, sm.input.curves, sm.input.finals,
                                                      sm.input.samples)}
summary = report.summarize(runs, baseline=p.baseline, out=Path(out.summary),
                           toy_r10=Path(sm.input.toy) if "toy" in sm.input.keys() else None,
                           benchmarks=Path(p.benchmarks), nfe_target=p.report.get("nfe_target"),
                           shards=[Path(f) for f in sm.input.shards] if "shards" in sm.input.keys() else None)
report.summary_table(summary, Path(out.table))
report.plot_training_curves({name: spec["run_dir"] for name, spec in runs.items()}, Path(out.training))
report.plot_nfe_curves({name: spec["nfe_curve"] for name, spec in runs.items()}, Path(out.nfe),
                       target=summary.get("nfe_target"))
report.benchmark_table(Path(p.benchmarks), Path(out.benchmarks))
if "gmm_weights" in out.keys():
    report.plot_gmm_weights(Path(sm.input.gmm), Path(out.gmm_weights))
if "r10_table" in out.keys():
    report.r10_table(Path(sm.input.toy), Path(out.r10_table))
for name, r in summary["runs"].items():
    print(f"{name:>16}: {r['metric']} {r['final']}, over steps {r['fd_over_steps']}")
if summary["data"]:
    print(report.images_line(summary["data"]))
