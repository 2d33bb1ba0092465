"""export_digits: scikit-learn's digits as a PNG class folder (mmfm.data.digits.export_digits)."""

import shutil
import faulthandler
import sys
from pathlib import Path

sys.stdout = sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821 (Snakemake's object)
faulthandler.enable(sys.stderr)  # a fatal signal (SIGBUS, SIGSEGV) leaves its traceback in the log

from mmfm.data.digits import export_digits  # noqa: E402

out = Path(snakemake.output[0])  # noqa: F821
shutil.rmtree(out, ignore_errors=True)  # a failed attempt's leftover; the folder is built beside it and renamed
print(export_digits(out))
