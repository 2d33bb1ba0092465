"""report: results/summary.json (mmfm.report) and the results page results/index.html with its figures and
decoded grids (mmfm.page), from the files the workflow wrote for this config."""

import faulthandler
import sys

sys.stdout = sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821 (Snakemake's object)
faulthandler.enable(sys.stderr)  # a fatal signal (SIGBUS, SIGSEGV) leaves its traceback in the log

from mmfm import page, report  # noqa: E402
from mmfm.config import job_device  # noqa: E402

sm = snakemake  # noqa: F821
summary, files = report.summarize_config(sm.config, strict=True)
page.draw_gallery(files, sm.config, job_device(sm), strict=True)
print(f"wrote {page.write(summary, files, strict=True)}")
for name, r in summary["runs"].items():
    print(f"{name:>16}: {r['metric']} {r['final']}, over NFE {r['fd_over_nfe']}")
if summary["data"]:
    print(report.images_line(summary["data"]))
