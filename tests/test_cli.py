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


def test_import_checkpoint_command(tmp_path, capsys):
    import json

    import torch

    from mmfm.models.ditdh import build_ditdh
    from mmfm.models.velocity import load_velocity_model

    net = build_ditdh("ditdh-tiny", in_channels=4, num_tokens=16)
    torch.save({"ema": net.state_dict(), "train_steps": 3}, tmp_path / "uncond-gmm-25k.pt")
    out = tmp_path / "v.safetensors"
    assert main(["import-checkpoint", "--checkpoint", str(tmp_path / "uncond-gmm-25k.pt"), "--out", str(out),
                 "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["preset"] == "ditdh-tiny" and line["conditioning"] == "none" and line["time_convention"] == "rae"
    x, t = torch.randn(2, 16, 4), torch.tensor([0.2, 0.7])
    with torch.no_grad():
        torch.testing.assert_close(load_velocity_model(out)(x, t), -net.eval()(x, 1 - t), rtol=0, atol=0)
    assert main(["import-checkpoint", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(out)]) == 2


def test_fd_command_on_features_and_stats(tmp_path, capsys):
    import json

    import numpy as np

    from mmfm.metrics.frechet import FeatureStats, frechet_distance_of, save_stats

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((300, 5)), rng.standard_normal((200, 5)) * 1.5 + 0.3
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    st = FeatureStats(5).update(b)
    save_stats(tmp_path / "b.npz", st.mu, st.sigma, {"n": st.n})
    for other in ("b.npy", "b.npz"):
        assert main(["fd", "--a", str(tmp_path / "a.npy"), "--b", str(tmp_path / other), "--json"]) == 0
        line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert abs(line["fd"] - frechet_distance_of(a, b)) < 1e-9 and line["n_b"] == 200


def test_fid_without_inception_weights_names_the_file(tmp_path, capsys, monkeypatch):
    import numpy as np

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    assert main(["fid", "--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz")]) == 2
    assert "pt_inception-2015-12-05-6726825d.pth" in capsys.readouterr().err
