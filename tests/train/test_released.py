import collections
import enum
import json
import pickle
import shutil

import numpy as np
import pytest
import torch

from mmfm import io
from mmfm.flow import RAEConvention
from mmfm.models import VelocityMLP, build_ditdh, count_parameters
from mmfm.models.velocity import load_velocity_model, read_metadata
from mmfm.train import released
from mmfm.train.released import import_released_checkpoint

C, N = 6, 16


def random_net(preset="ditdh-tiny", **kw):
    kw = {"in_channels": C, "num_tokens": N, **kw}
    net = build_ditdh(preset, **kw)
    for p in net.parameters():  # random weights everywhere (the zero-initialized output layers included)
        p.data.normal_(0, 0.1)
    return net.eval()


def perturbed(sd):
    return {k: v + 0.05 * torch.randn_like(v) for k, v in sd.items()}


def save_release(path, sd, *, ema=True, model=True, prefix="", bare=False, **extra):
    sd = {prefix + k: v for k, v in sd.items()}
    if bare:
        torch.save(sd, path)
        return path
    payload = {"opt": {"state": {}, "param_groups": [{"lr": 2e-4}]}, "train_steps": 10, **extra}
    if model:
        payload["model"] = perturbed(sd)
    if ema:
        payload["ema"] = sd
    torch.save(payload, path)
    return path


def inputs(net, b=3):
    x, t = torch.randn(b, net.num_tokens, net.in_channels), torch.rand(b)
    y = torch.randint(0, max(net.num_classes, 1), (b,)) if net.num_classes else None
    return x, t, y


def assert_nothing_written(tmp_path, *keep):
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


VARIANTS = {  # name: (build kwargs, file name, import kwargs, expected conditioning / num_classes / null / source)
    "uncond-no-table": (dict(), "ckpt.pt", {}, ("none", 0, None, "no label table")),
    "uncond-unused-table": (dict(num_classes=5), "uncond-gmm-25k.pt", {}, ("none", 5, None, "file name")),
    "class-with-null": (dict(conditioning="class", num_classes=4, class_dropout_prob=0.1), "ep-0000080.pt",
                        dict(conditioning="class"), ("class", 4, 4, "argument")),
    "mode": (dict(conditioning="mode", num_classes=3), "mode-gmm-100k.pt", {}, ("mode", 3, None, "file name")),
}


@pytest.mark.parametrize("wrap", ["plain", "module.", "module._orig_mod.", "_orig_mod.", "bare"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_round_trip_is_the_rae_network_in_paper_convention(tmp_path, variant, wrap):
    build, name, kwargs, (cond, k, null, source) = VARIANTS[variant]
    net = random_net(**build)
    sd = net.state_dict()
    prefix = "" if wrap in ("plain", "bare") else wrap
    src = save_release(tmp_path / name, sd, prefix=prefix, bare=wrap == "bare")
    meta = import_released_checkpoint(src, tmp_path / "v.safetensors", **kwargs)

    assert (meta["conditioning"], meta["num_classes"], meta["null_label"], meta["conditioning_from"]) == (
        cond, k, null, source)
    assert meta["entry"] == (None if wrap == "bare" else "ema")
    assert "".join(meta["stripped_prefixes"]) == prefix
    assert meta["time_convention"] == "rae" and meta["source_file"] == name

    v = load_velocity_model(tmp_path / "v.safetensors")
    assert isinstance(v, RAEConvention) and not v.training
    x, t, y = inputs(net)
    cond_kw = {} if y is None else {"y": y}
    with torch.no_grad():
        got = v(x, t, **cond_kw)
        expect = -net(x, 1 - t, **cond_kw)
    assert torch.equal(got, expect)  # exactly RAEConvention(original network)
    if wrap != "bare":  # the EMA entry was used, not the (perturbed) training weights
        other = build_ditdh("ditdh-tiny", in_channels=C, num_tokens=N, **build).eval()
        raw = torch.load(src, weights_only=True)["model"]
        other.load_state_dict({key[len(prefix):]: w for key, w in raw.items()})
        with torch.no_grad():
            assert not torch.allclose(got, -other(x, 1 - t, **cond_kw))


def test_inferred_architecture_and_metadata(tmp_path):
    net = random_net("ditdh-demo", in_channels=12, num_tokens=64, patch_size=2, conditioning="mode", num_classes=7)
    src = save_release(tmp_path / "dit-s-mode-gmm-25k.pt", net.state_dict())
    meta = import_released_checkpoint(src, tmp_path / "out" / "demo.safetensors")
    assert {k: meta[k] for k in ("preset", "in_channels", "num_tokens", "patch_size", "conditioning", "num_classes",
                                 "label_rows")} == dict(preset="ditdh-demo", in_channels=12, num_tokens=64,
                                                        patch_size=2, conditioning="mode", num_classes=7,
                                                        label_rows=7)
    assert meta["num_parameters"] == count_parameters(net)
    assert meta["train_steps"] == 10
    assert meta["source_sha256"] == __import__("hashlib").sha256(src.read_bytes()).hexdigest()
    sidecar = json.loads((tmp_path / "out" / "demo.json").read_text())
    assert sidecar == meta == read_metadata(tmp_path / "out" / "demo.safetensors")
    arch = released.infer_architecture(net.state_dict())
    assert (arch["depth"], arch["num_heads"], arch["head_hidden_size"], arch["head_depth"], arch["head_num_heads"]) == (
        4, 4, 256, 1, 4)
    # the file holds exactly the network's float32 state dict
    arrays, header_meta = io.open_tensors(tmp_path / "out" / "demo.safetensors")
    assert header_meta == meta
    assert sorted(arrays) == sorted(net.state_dict())
    for key, value in net.state_dict().items():
        assert arrays[key].dtype == np.float32 and np.array_equal(arrays[key], value.numpy())
    v = load_velocity_model(tmp_path / "out" / "demo.safetensors")
    x, t, y = inputs(net)
    with torch.no_grad():
        assert torch.equal(v(x, t, y=y), -net(x, 1 - t, y=y))


@pytest.mark.parametrize("preset", ["ditdh-s", "ditdh-b", "ditdh-l", "ditdh-xl"])
def test_paper_sizes_are_recognized_from_shapes(preset):
    with torch.device("meta"):  # shapes only: the XL release layout without allocating 3.4 GB
        net = build_ditdh(preset, conditioning="mode", num_classes=8192)
    arch = released.infer_architecture(net.state_dict())
    assert arch["preset"] == preset
    assert (arch["in_channels"], arch["num_tokens"], arch["patch_size"], arch["label_rows"]) == (768, 256, 1, 8192)
    assert (arch["head_hidden_size"], arch["head_depth"], arch["head_num_heads"]) == (2048, 2, 16)


def test_legacy_torch_format(tmp_path):
    net = random_net()
    torch.save({"ema": net.state_dict()}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    import_released_checkpoint(tmp_path / "old.pt", tmp_path / "v.safetensors")
    x, t, _ = inputs(net)
    with torch.no_grad():
        assert torch.equal(load_velocity_model(tmp_path / "v.safetensors")(x, t), -net(x, 1 - t))


def test_bf16_release_is_stored_as_float32(tmp_path):
    net = random_net()
    sd = {k: v.to(torch.bfloat16) for k, v in net.state_dict().items()}
    src = save_release(tmp_path / "uncond.pt", sd)
    import_released_checkpoint(src, tmp_path / "v.safetensors")
    arrays, _ = io.open_tensors(tmp_path / "v.safetensors")
    assert all(a.dtype == np.float32 for a in arrays.values())
    assert np.array_equal(arrays["pos_embed"], sd["pos_embed"].float().numpy())


def test_only_model_entry_needs_explicit_entry(tmp_path):
    net = random_net(conditioning="mode", num_classes=3)
    src = save_release(tmp_path / "mode-gmm-5k.pt", net.state_dict(), ema=False)
    with pytest.raises(ValueError, match=r"mode-gmm-5k\.pt: has no 'ema' entry.*entry='model'"):
        import_released_checkpoint(src, tmp_path / "v.safetensors")
    assert_nothing_written(tmp_path, "mode-gmm-5k.pt")
    meta = import_released_checkpoint(src, tmp_path / "v.safetensors", entry="model")
    assert meta["entry"] == "model"
    raw = torch.load(src, weights_only=True)["model"]
    trained = build_ditdh("ditdh-tiny", in_channels=C, num_tokens=N, conditioning="mode", num_classes=3).eval()
    trained.load_state_dict(raw)
    x, t, y = inputs(trained)
    with torch.no_grad():
        assert torch.equal(load_velocity_model(tmp_path / "v.safetensors")(x, t, y=y), -trained(x, 1 - t, y=y))
    with pytest.raises(ValueError, match="no 'weights' entry"):
        import_released_checkpoint(src, tmp_path / "w.safetensors", entry="weights")


def _other_arch_cases():
    tiny = random_net().state_dict()
    missing = {k: v for k, v in tiny.items() if k != "t_embedder.W"}
    extra = {**tiny, "blocks.0.attn.q_norm.weight": torch.ones(16)}
    shape = {**tiny, "final_layer.linear.bias": torch.zeros(C + 1)}
    return {
        "depth": (build_ditdh("ditdh-tiny", in_channels=C, num_tokens=N, depth=3).state_dict(),
                  r"depth=3.*none of the DiTDH presets"),
        "width": (build_ditdh("ditdh-tiny", in_channels=C, num_tokens=N, hidden_size=48, num_heads=3).state_dict(),
                  r"hidden_size=48.*none of the DiTDH presets"),
        "mlp": (VelocityMLP(4).state_dict(), r"not a DiTDH .*missing \['s_embedder.proj.weight'"),
        "missing": (missing, r"1 missing, first \['t_embedder.W'\]"),
        "extra": (extra, r"1 unexpected, first \['blocks.0.attn.q_norm.weight'\]"),
        "shape": (shape, r"final_layer.linear.bias \(7,\) \(expected \(6,\)\)"),
        "mixed-prefix": ({("module." + k if i % 2 else k): v for i, (k, v) in enumerate(tiny.items())},
                         r"not a DiTDH|missing"),
    }


@pytest.mark.parametrize("case", sorted(_other_arch_cases()))
def test_other_architectures_and_bad_keys_are_named_errors(tmp_path, case):
    sd, pattern = _other_arch_cases()[case]
    src = save_release(tmp_path / "uncond-x.pt", sd)
    with pytest.raises(ValueError, match=pattern) as err:
        import_released_checkpoint(src, tmp_path / "v.safetensors")
    assert "uncond-x.pt" in str(err.value)
    assert_nothing_written(tmp_path, "uncond-x.pt")


def test_asserted_preset_num_classes_and_conditioning_are_checked(tmp_path):
    src = save_release(tmp_path / "mode-gmm-25k.pt", random_net(conditioning="mode", num_classes=3).state_dict())
    out = tmp_path / "v.safetensors"
    with pytest.raises(ValueError, match=r"mode-gmm-25k\.pt: modes K 4 asserted.* 3 rows"):
        import_released_checkpoint(src, out, num_classes=4)
    with pytest.raises(ValueError, match=r"not a ditdh-demo: hidden_size 32 \(preset 128\)"):
        import_released_checkpoint(src, out, preset="ditdh-demo")
    with pytest.raises(ValueError, match="preset: unknown"):
        import_released_checkpoint(src, out, preset="ditdh-xxl")
    with pytest.raises(ValueError, match=r"num_classes 1 asserted.*3 rows \(expected 1 or 2 with the null label\)"):
        import_released_checkpoint(src, out, num_classes=1, conditioning="class")
    assert_nothing_written(tmp_path, "mode-gmm-25k.pt")
    meta = import_released_checkpoint(src, out, num_classes=3, preset="ditdh-tiny")
    assert (meta["preset"], meta["num_classes"]) == ("ditdh-tiny", 3)

    plain = save_release(tmp_path / "plain.pt", random_net().state_dict())
    with pytest.raises(ValueError, match="needs a label table"):
        import_released_checkpoint(plain, tmp_path / "p.safetensors", conditioning="mode")
    with pytest.raises(ValueError, match="num_classes 5 asserted, but the checkpoint has no label table"):
        import_released_checkpoint(plain, tmp_path / "p.safetensors", num_classes=5)


def test_ambiguous_table_needs_conditioning(tmp_path):
    src = save_release(tmp_path / "0025000.pt", random_net(conditioning="mode", num_classes=3).state_dict())
    with pytest.raises(ValueError, match=r"0025000\.pt: cannot tell how its 3-row label table is used.*conditioning="):
        import_released_checkpoint(src, tmp_path / "v.safetensors")
    assert_nothing_written(tmp_path, "0025000.pt")
    # an asserted K with one more row than K is a class table with the null label
    net = random_net(conditioning="class", num_classes=2, class_dropout_prob=0.1)
    src = save_release(tmp_path / "classes.pt", net.state_dict())
    meta = import_released_checkpoint(src, tmp_path / "c.safetensors", num_classes=2)
    assert (meta["conditioning"], meta["num_classes"], meta["null_label"]) == ("class", 2, 2)
    # a class table without the null label, when K is asserted equal to the rows
    meta = import_released_checkpoint(src, tmp_path / "d.safetensors", num_classes=3, conditioning="class")
    assert (meta["num_classes"], meta["null_label"]) == (3, None)


def test_rae_class_conditional_table_is_recognized(tmp_path):
    net = random_net(conditioning="class", num_classes=1000, class_dropout_prob=0.1)
    src = save_release(tmp_path / "ep-last.pt", net.state_dict())
    meta = import_released_checkpoint(src, tmp_path / "v.safetensors")
    assert (meta["conditioning"], meta["num_classes"], meta["null_label"]) == ("class", 1000, 1000)
    v = load_velocity_model(tmp_path / "v.safetensors")
    x, t = torch.randn(2, N, C), torch.rand(2)
    y = torch.tensor([7, 1000])  # the null label is a valid input (CFG's unconditional half)
    with torch.no_grad():
        assert torch.equal(v(x, t, y=y), -net(x, 1 - t, y=y))


class _Node:
    """Stands for an OmegaConf value node (pickled state ``{"_val": ...}``)."""

    def __init__(self, val):
        self.val = val

    def __getstate__(self):
        return {"_val": self.val, "_parent": None}


class _Config:
    """Stands for an OmegaConf DictConfig saved in ``training_cfg``."""

    def __init__(self, content):
        self.content = content

    def __getstate__(self):
        return {"_content": self.content, "_metadata": None}


class _Flag(enum.Enum):
    ON = 1


class _Evil:
    """Unpickling this would copy a file: the importer must not run it."""

    def __init__(self, src, dst):
        self.src, self.dst = src, dst

    def __reduce__(self):
        return shutil.copyfile, (self.src, self.dst)


def test_config_objects_are_read_without_running_code(tmp_path):
    net = random_net(conditioning="mode", num_classes=3)
    marker_src, marker_dst = tmp_path / "marker.txt", tmp_path / "copied.txt"
    marker_src.write_text("x")
    cfg = _Config({"model": _Config({"params": _Config({"use_y_conditioning": _Node(True), "num_classes": _Node(3)})})})
    src = save_release(tmp_path / "0100000.pt", net.state_dict(), training_cfg=cfg, config_path="configs/x.yaml",
                       hook=_Evil(str(marker_src), str(marker_dst)), flag=_Flag.ON,
                       resolvers=collections.defaultdict(list, {"a": [1]}),
                       cli_overrides={"precision": "bf16", "global_seed": 0})
    meta = import_released_checkpoint(src, tmp_path / "v.safetensors")
    assert not marker_dst.exists()  # shutil.copyfile was never called
    assert (meta["conditioning"], meta["conditioning_from"]) == ("mode", "checkpoint config")
    assert meta["config_path"] == "configs/x.yaml" and meta["cli_overrides"]["precision"] == "bf16"

    # a plain-dict config saying the table is unused
    uncond = random_net(num_classes=3)
    src = save_release(tmp_path / "0200000.pt", uncond.state_dict(),
                       training_cfg={"model": {"params": {"use_y_conditioning": False}}})
    meta = import_released_checkpoint(src, tmp_path / "u.safetensors")
    assert (meta["conditioning"], meta["num_classes"]) == ("none", 3)
    x, t, _ = inputs(uncond)
    with torch.no_grad():
        assert torch.equal(load_velocity_model(tmp_path / "u.safetensors")(x, t), -uncond(x, 1 - t))


def test_blocklisted_globals_are_refused(tmp_path):
    class Boom:
        def __reduce__(self):
            return __import__("os").system, ("true",)

    src = tmp_path / "boom.pt"
    torch.save({"ema": random_net().state_dict(), "x": Boom()}, src)
    with pytest.raises(ValueError, match=r"boom\.pt: not a checkpoint readable with torch.load\(weights_only=True\): "
                                         r".*system whose module \w+ is blocked"):
        import_released_checkpoint(src, tmp_path / "v.safetensors")
    assert_nothing_written(tmp_path, "boom.pt")


def _unreadable(tmp_path, kind):
    path = tmp_path / f"{kind}.pt"
    if kind == "truncated":
        save_release(path, random_net().state_dict())
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "list":
        torch.save([random_net().state_dict()], path)
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "plain-pickle":
        path.write_bytes(pickle.dumps({"ema": [1, 2, 3]}))
    elif kind == "ema-not-tensors":
        torch.save({"ema": {"a": 1}, "model": {"a": 2}}, path)
    return path


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind, pattern", [
    ("truncated", "not a checkpoint readable"), ("garbage", "not a checkpoint readable"),
    ("empty", "not a checkpoint readable"), ("list", "expected a dict.*got list"),
    ("tensor", "expected a dict.*got Tensor"), ("plain-pickle", "not a checkpoint readable"),
    ("ema-not-tensors", "entry 'ema' is not a state dict of tensors"),
])
def test_unreadable_files_are_named_errors(tmp_path, kind, pattern):
    path = _unreadable(tmp_path, kind)
    with pytest.raises(ValueError, match=pattern) as err:
        import_released_checkpoint(path, tmp_path / "v.safetensors")
    assert path.name in str(err.value)
    assert_nothing_written(tmp_path, path.name)


def test_bad_paths(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        import_released_checkpoint(tmp_path / "absent.pt", tmp_path / "v.safetensors")
    src = save_release(tmp_path / "a.pt", random_net().state_dict())
    with pytest.raises(ValueError, match="out: expected a .safetensors"):
        import_released_checkpoint(src, tmp_path / "v.json")
    assert_nothing_written(tmp_path, "a.pt")


def test_nothing_half_written_when_the_sidecar_fails(tmp_path, monkeypatch):
    src = save_release(tmp_path / "a.pt", random_net().state_dict())

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(io, "write_json", fail)
    with pytest.raises(OSError, match="disk full"):
        import_released_checkpoint(src, tmp_path / "v.safetensors")
    assert_nothing_written(tmp_path, "a.pt")


def test_output_reads_back_without_pickle(tmp_path, monkeypatch):
    net = random_net(conditioning="mode", num_classes=3)
    src = save_release(tmp_path / "mode-gmm.pt", net.state_dict())
    import_released_checkpoint(src, tmp_path / "v.safetensors")

    def no_pickle(*args, **kwargs):
        raise AssertionError("pickle used")

    for mod, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(mod, name, no_pickle)
    v = load_velocity_model(tmp_path / "v.safetensors")
    arrays, meta = io.open_tensors(tmp_path / "v.safetensors")
    assert meta["conditioning"] == "mode" and "pos_embed" in arrays
    from safetensors.numpy import load_file  # an ordinary reader opens it too
    assert np.array_equal(load_file(str(tmp_path / "v.safetensors"))["t_embedder.W"], net.t_embedder.W.numpy())
    x, t, y = inputs(net)
    with torch.no_grad():
        assert torch.equal(v(x, t, y=y), -net(x, 1 - t, y=y))


def test_load_velocity_model_rejects_foreign_or_damaged_files(tmp_path):
    io.save_tensors(tmp_path / "gmm.safetensors", {"weights": np.ones(3, np.float32)}, {"kind": "cls-gmm"})
    with pytest.raises(ValueError, match=r"gmm\.safetensors: not an imported DiTDH velocity network"):
        load_velocity_model(tmp_path / "gmm.safetensors")
    net = random_net()
    import_released_checkpoint(save_release(tmp_path / "a.pt", net.state_dict()), tmp_path / "v.safetensors")
    arrays, meta = io.open_tensors(tmp_path / "v.safetensors")
    io.save_tensors(tmp_path / "cut.safetensors", {k: np.array(a) for k, a in arrays.items() if k != "pos_embed"}, meta)
    with pytest.raises(ValueError, match=r"cut\.safetensors: does not load strictly.*'pos_embed'"):
        load_velocity_model(tmp_path / "cut.safetensors")
    io.save_tensors(tmp_path / "paper.safetensors", {k: np.array(a) for k, a in arrays.items()},
                    {**meta, "time_convention": "paper"})
    plain = load_velocity_model(tmp_path / "paper.safetensors")
    assert not isinstance(plain, RAEConvention)  # no flip for a network already in the paper's convention
    x, t, _ = inputs(net)
    with torch.no_grad():
        assert torch.equal(plain(x, t), net(x, t))
    io.save_tensors(tmp_path / "odd.safetensors", {k: np.array(a) for k, a in arrays.items()},
                    {**meta, "time_convention": "edm"})
    with pytest.raises(ValueError, match="unknown time_convention 'edm'"):
        load_velocity_model(tmp_path / "odd.safetensors")
