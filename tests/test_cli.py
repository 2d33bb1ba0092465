import shutil
import subprocess
import sys

from mmfm.cli import main


def test_console_entry_point_is_installed_and_documents_stages():
    exe = shutil.which("mmfm") or [sys.executable, "-m", "mmfm.cli"]
    cmd = [exe] if isinstance(exe, str) else exe
    out = subprocess.run([*cmd, "toy", "r10", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--json" in out and "W2" in out


def test_bad_input_is_one_clear_line_and_exit_2(capsys, tmp_path):
    code = main(["toy", "r10", "--iters", "0", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "iters" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()
