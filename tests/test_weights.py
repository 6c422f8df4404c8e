"""Checkpoint reading (every official MAISI layout), safety, strict loading, safetensors conversion, convert CLI."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from fastmaisi import weights
from fastmaisi.config import read_network_definition, resolve_network_definition
from fastmaisi.weights import CheckpointError, convert, convert_main, load_into, load_state_dict_file, sha256_file

# The official configs live in the shared reference folder beside the repository; a fresh clone may not have it.
OFFICIAL_CONFIGS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "configs"


class Tiny(nn.Module):
    def __init__(self, channels: int = 4):
        super().__init__()
        self.conv = nn.Conv3d(1, channels, 3)
        self.norm = nn.GroupNorm(2, channels)
        self.head = nn.Linear(channels, 2)
        self.register_buffer("scale", torch.ones(1))


class RunsCode:
    """Pickles to a call of os.system: what a malicious checkpoint carries."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def tiny_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return Tiny().state_dict()


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


LAYOUTS = {
    # name: (wrap(state_dict) -> object torch.save'd, expected meta)
    "raw": (lambda sd: sd, {"layout": "raw"}),
    "diffusion unet": (
        lambda sd: {
            "epoch": 300,
            "loss": torch.tensor(0.12),
            "num_train_timesteps": 1000,
            "scale_factor": torch.tensor(1.0055984258651733),
            "unet_state_dict": sd,
        },
        {"layout": "unet_state_dict", "scale_factor": float(torch.tensor(1.0055984258651733))},
    ),
    "autoencoder in unet_state_dict": (lambda sd: {"unet_state_dict": sd}, {"layout": "unet_state_dict"}),
    "controlnet": (
        lambda sd: {"epoch": 7, "loss": torch.tensor(0.3), "controlnet_state_dict": sd},
        {"layout": "controlnet_state_dict"},
    ),
    "state_dict": (lambda sd: {"state_dict": sd}, {"layout": "state_dict"}),
    "trainer": (
        lambda sd: {"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]}, "step": 5},
        {"layout": "model"},
    ),
    "DDP module. prefix": (lambda sd: {f"module.{k}": v for k, v in sd.items()}, {"layout": "raw"}),
    "DDP + compile prefixes": (
        lambda sd: {"unet_state_dict": {f"_orig_mod.module.{k}": v for k, v in sd.items()}, "scale_factor": 2.0},
        {"layout": "unet_state_dict", "scale_factor": 2.0},
    ),
}


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_loads(tmp_path, layout, legacy):
    wrap, expected_meta = LAYOUTS[layout]
    sd = tiny_state()
    path = tmp_path / "ckpt.pt"
    torch.save(wrap(sd), path, _use_new_zipfile_serialization=not legacy)

    loaded, meta = load_state_dict_file(path)
    assert_same(loaded, sd)
    assert meta == expected_meta

    net = Tiny()
    assert load_into(net, path) == expected_meta
    assert_same(net.state_dict(), sd)


def test_prefix_is_kept_unless_every_key_has_it(tmp_path):
    sd = {"module.a": torch.zeros(1), "b": torch.ones(1)}
    torch.save(sd, tmp_path / "x.pt")
    assert list(load_state_dict_file(tmp_path / "x.pt")[0]) == ["module.a", "b"]


def test_malicious_pickle_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "code_ran"
    evil_torch = tmp_path / "evil.pt"
    torch.save({"unet_state_dict": tiny_state(), "scale_factor": RunsCode(marker)}, evil_torch)
    evil_plain = tmp_path / "evil.pth"
    with open(evil_plain, "wb") as f:
        pickle.dump({"w": RunsCode(marker)}, f, protocol=4)

    for path in (evil_torch, evil_plain):
        with pytest.raises(CheckpointError, match="not a plain-tensor checkpoint") as info:
            load_state_dict_file(path)
        assert str(path) in str(info.value)
        with pytest.raises(CheckpointError):
            load_into(Tiny(), path)
    assert "system" in str(pytest.raises(CheckpointError, load_state_dict_file, evil_torch).value)
    assert not marker.exists()


def test_damaged_or_foreign_files_each_get_one_clear_error(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"unet_state_dict": tiny_state(), "scale_factor": torch.tensor(1.0)}, good)
    legacy = tmp_path / "legacy.pt"
    torch.save(tiny_state(), legacy, _use_new_zipfile_serialization=False)
    rng = random.Random(0)
    cases = {
        "truncated.pt": (good.read_bytes()[: good.stat().st_size // 2], "truncated or corrupt"),
        "truncated_legacy.pt": (legacy.read_bytes()[:300], "truncated or corrupt"),
        "notes.pt": (b"these are not weights\n", "not a PyTorch checkpoint"),
        "noise.pth": (b"\x00" + bytes(rng.randrange(256) for _ in range(999)), "not a PyTorch checkpoint"),
        "empty.pt": (b"", "empty"),
        "empty.safetensors": (b"", "empty"),
        "notes.safetensors": (b"these are not weights either", "not a valid safetensors file"),
    }
    for name, (data, phrase) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=phrase) as info:
            load_state_dict_file(path)
        assert name in str(info.value), name

    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_state_dict_file(tmp_path / "missing.pt")


def test_pickles_that_are_not_state_dicts(tmp_path):
    cases = {
        "list.pt": ([torch.zeros(1)], "holds a list"),
        "no_tensors.pt": ({"epoch": 3, "loss": 0.1}, r"holds no state dict.*epoch, loss"),
        "empty_dict.pt": ({}, "empty state dict"),
        "bad_entry.pt": ({"unet_state_dict": {"w": torch.zeros(1), "note": "hi"}}, "'note' is a str"),
        "bad_scale.pt": ({"unet_state_dict": tiny_state(), "scale_factor": torch.ones(2)}, "scale_factor"),
    }
    for name, (obj, phrase) in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(CheckpointError, match=phrase):
            load_state_dict_file(tmp_path / name)


def test_strict_mismatch_lists_keys_and_leaves_net_untouched(tmp_path):
    sd = tiny_state()
    del sd["norm.weight"], sd["head.bias"]
    sd["extra.weight"] = torch.zeros(3)
    sd["conv.weight"] = torch.zeros(8, 1, 3, 3, 3)
    path = tmp_path / "diff_unet.pt"
    torch.save({"unet_state_dict": sd}, path)

    net = Tiny()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_into(net, path)
    msg = str(info.value)
    assert msg.startswith("diff_unet.pt does not match Tiny: ")
    assert "2 missing keys (norm.weight, head.bias)" in msg
    assert "1 unexpected key (extra.weight)" in msg
    assert "1 shape mismatch (conv.weight: checkpoint (8, 1, 3, 3, 3) vs network (4, 1, 3, 3, 3))" in msg
    assert_same(net.state_dict(), before)
    with pytest.raises(CheckpointError, match=r"^diff_unet.pt \(diffusion_unet\) does not match Tiny: 2 missing"):
        load_into(net, path, name="diffusion_unet")


def test_mismatch_message_shows_ten_keys_and_a_count():
    net = nn.Sequential(*[nn.Linear(1, 1) for _ in range(8)])  # 16 keys
    with pytest.raises(CheckpointError) as info:
        load_into(net, {"other": torch.zeros(1)}, name="mask AE")
    shown = ", ".join(f"{i}.{p}" for i in range(5) for p in ("weight", "bias"))
    assert str(info.value) == (
        f"mask AE does not match Sequential: 16 missing keys ({shown}, ... 6 more); 1 unexpected key (other)"
    )


def test_convert_round_trip(tmp_path):
    sd = tiny_state()
    ckpt = tmp_path / "diff_unet_3d_rflow-ct.pt"
    torch.save({"unet_state_dict": sd, "scale_factor": torch.tensor(0.8731), "epoch": 3}, ckpt)
    out = tmp_path / "out" / "unet.safetensors"
    out.parent.mkdir()

    record = convert(ckpt, out)
    sidecar = json.loads((out.parent / "unet.safetensors.json").read_text())
    assert sidecar == record
    assert sidecar == {
        "format": "fastmaisi-weights/1",
        "source": "diff_unet_3d_rflow-ct.pt",
        "source_sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest(),
        "layout": "unet_state_dict",
        "scale_factor": float(torch.tensor(0.8731)),
    }
    assert sha256_file(ckpt) == sidecar["source_sha256"]

    loaded, meta = load_state_dict_file(out)
    original, original_meta = load_state_dict_file(ckpt)
    assert_same(loaded, original)
    assert meta == {"layout": "safetensors", "scale_factor": original_meta["scale_factor"]}
    net = Tiny()
    assert load_into(net, out)["scale_factor"] == original_meta["scale_factor"]
    assert_same(net.state_dict(), sd)
    assert sorted(p.name for p in out.parent.iterdir()) == ["unet.safetensors", "unet.safetensors.json"]
    mode = ckpt.stat().st_mode & 0o777  # what an ordinary new file gets under this umask
    assert [p.stat().st_mode & 0o777 for p in out.parent.iterdir()] == [mode, mode]


def test_convert_handles_tied_weights_and_rejects_other_suffixes(tmp_path):
    shared = torch.randn(4, 4)
    torch.save({"a.weight": shared, "b.weight": shared, "row": shared[1]}, tmp_path / "tied.pt")
    convert(tmp_path / "tied.pt", tmp_path / "tied.safetensors")
    loaded, _ = load_state_dict_file(tmp_path / "tied.safetensors")
    assert torch.equal(loaded["a.weight"], shared) and torch.equal(loaded["b.weight"], shared)
    assert torch.equal(loaded["row"], shared[1])
    with pytest.raises(ValueError, match=r"\.safetensors"):
        convert(tmp_path / "tied.pt", tmp_path / "tied.pt2")


def test_safetensors_sidecar_is_checked(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(tiny_state(), path)
    assert load_state_dict_file(path)[1] == {"layout": "safetensors"}
    sidecar = tmp_path / "w.safetensors.json"
    sidecar.write_text('{"scale_factor": 1.5}')
    assert load_state_dict_file(path)[1] == {"layout": "safetensors", "scale_factor": 1.5}
    sidecar.write_text('{"format": "something-else/2"}')
    with pytest.raises(CheckpointError, match="w.safetensors.json"):
        load_state_dict_file(path)
    sidecar.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_state_dict_file(path)


def test_convert_checks_the_network_before_writing(tmp_path, monkeypatch):
    import fastmaisi.nets

    built = []

    def fake_build(definition):
        built.append(definition)
        return Tiny(definition["channels"])

    monkeypatch.setattr(fastmaisi.nets, "build", fake_build)
    torch.save({"controlnet_state_dict": tiny_state()}, tmp_path / "cn.pt")
    definition = {"_target_": "Tiny", "channels": 4}
    record = convert(tmp_path / "cn.pt", tmp_path / "cn.safetensors", definition)
    assert built == [definition] and record["network_definition"] == definition
    assert load_state_dict_file(tmp_path / "cn.safetensors")[1]["network_definition"] == definition

    with pytest.raises(CheckpointError, match="cn.pt does not match Tiny: .*shape mismatch"):
        convert(tmp_path / "cn.pt", tmp_path / "wrong.safetensors", {"_target_": "Tiny", "channels": 8})
    assert not list(tmp_path.glob("wrong*")) and not list(tmp_path.glob(".*tmp"))


def test_interrupted_convert_leaves_no_final_file(tmp_path, monkeypatch):
    torch.save(tiny_state(), tmp_path / "ae.pt")

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(weights, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        convert(tmp_path / "ae.pt", tmp_path / "ae.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ae.pt"]


def test_convert_main(tmp_path, capsys, monkeypatch):
    torch.save({"unet_state_dict": tiny_state(), "scale_factor": torch.tensor(1.25)}, tmp_path / "dm.pt")
    assert convert_main([str(tmp_path / "dm.pt"), "-o", str(tmp_path / "dm.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "dm.safetensors" in out and "scale_factor 1.25" in out
    assert load_state_dict_file(tmp_path / "dm.safetensors")[1]["scale_factor"] == 1.25

    import fastmaisi.nets

    monkeypatch.setattr(fastmaisi.nets, "build", lambda d: Tiny(d["num_channels"]))
    config = tmp_path / "config_network.json"
    config.write_text(json.dumps({"width": 4, "tiny_def": {"_target_": "Tiny", "num_channels": "@width"}}))
    net_args = ["--network-config", str(config), "--network", "tiny_def"]
    assert convert_main([str(tmp_path / "dm.pt"), "-o", str(tmp_path / "checked.safetensors"), *net_args]) == 0
    capsys.readouterr()

    marker = tmp_path / "code_ran"
    torch.save({"w": RunsCode(marker)}, tmp_path / "evil.pt")
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    torch.save({"unet_state_dict": {"other": torch.zeros(1)}}, tmp_path / "wrong.pt")
    bad_inputs = {
        "missing.pt": ("missing.pt", []),
        "notes.pt": ("not a PyTorch checkpoint", []),
        "evil.pt": ("not a plain-tensor checkpoint", []),
        "dm.pt": ("unknown network 'vae_def'; this config defines: tiny_def", net_args[:-1] + ["vae_def"]),
        "wrong.pt": ("wrong.pt does not match Tiny: 7 missing keys", net_args),
    }
    for name, (phrase, extra) in bad_inputs.items():
        assert convert_main([str(tmp_path / name), "-o", str(tmp_path / "bad.safetensors"), *extra]) == 2, name
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.count("\n") == 1 and captured.err.startswith("fastmaisi convert: error: "), captured.err
        assert phrase in captured.err and "Traceback" not in captured.err, captured.err
    assert not marker.exists() and not (tmp_path / "bad.safetensors").exists()


def test_resolve_network_definition_references():
    config = {
        "spatial_dims": 3,
        "latent_channels": 4,
        "channels": "@latent_channels",
        "levels": {"deep": [False, True]},
        "unet_def": {
            "_target_": "X", "dims": "@spatial_dims", "ch": "@channels",  # chained: channels -> latent_channels
            "attn": "@levels::deep", "a0": "@levels#deep#1", "lst": ["@spatial_dims", 1],
        },
        "expr_def": {"_target_": "X", "dims": "$@spatial_dims * 2"},
        "macro_def": {"_target_": "X", "dims": "%other.json#spatial_dims"},
        "dangling_def": {"_target_": "X", "dims": "@nope"},
        "loop_def": {"_target_": "X", "dims": "@a"},
        "a": "@b",
        "b": "@a",
    }
    assert resolve_network_definition(config, "unet_def") == {
        "_target_": "X", "dims": 3, "ch": 4, "attn": [False, True], "a0": True, "lst": [3, 1]
    }
    assert config["unet_def"]["dims"] == "@spatial_dims"  # the input is not modified
    for key, phrase in {
        "expr_def": "Python expression",
        "macro_def": "macro",
        "dangling_def": "does not exist",
        "loop_def": "circular reference",
        "vae_def": "unknown network 'vae_def'; this config defines: "
        "dangling_def, expr_def, loop_def, macro_def, unet_def$",
        "spatial_dims": "unknown network",
    }.items():
        with pytest.raises(ValueError, match=phrase):
            resolve_network_definition(config, key)


def test_read_network_definition_names_the_file(tmp_path):
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        read_network_definition(tmp_path / "bad.json", "x_def")
    (tmp_path / "c.json").write_text('{"a_def": {"_target_": "X"}}')
    with pytest.raises(ValueError, match="c.json: unknown network 'b_def'"):
        read_network_definition(tmp_path / "c.json", "b_def")


@pytest.mark.skipif(not OFFICIAL_CONFIGS.is_dir(), reason="official configs not beside this checkout")
@pytest.mark.parametrize("variant, body_region", [("rflow", False), ("ddpm", True)])
def test_official_network_configs_resolve(variant, body_region):
    path = OFFICIAL_CONFIGS / f"config_network_{variant}.json"
    config = json.loads(path.read_text())
    keys = [k for k in config if k.endswith("_def")]
    assert {"autoencoder_def", "diffusion_unet_def", "controlnet_def", "mask_generation_autoencoder_def",
            "mask_generation_diffusion_def"} <= set(keys)

    def strings(value):
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)]
        if isinstance(value, list):
            return [s for v in value for s in strings(v)]
        return [value] if isinstance(value, str) else []

    for key in keys:
        definition = read_network_definition(path, key)
        assert not [s for s in strings(definition) if s[:1] in "@$%"], key
        assert definition["spatial_dims"] == 3
    unet = read_network_definition(path, "diffusion_unet_def")
    assert (unet["in_channels"], unet["out_channels"]) == (4, 4)
    assert unet["include_top_region_index_input"] is body_region
    assert unet["include_bottom_region_index_input"] is body_region
    ae = read_network_definition(path, "autoencoder_def")
    assert (ae["in_channels"], ae["latent_channels"]) == (1, 4)


def test_autoencoder_round_trip(tmp_path):
    from fastmaisi.nets import build

    definition = {
        "_target_": "monai.apps.generation.maisi.networks.autoencoderkl_maisi.AutoencoderKlMaisi",
        "spatial_dims": 3, "in_channels": 1, "out_channels": 1, "latent_channels": 4, "num_channels": [8, 8, 8],
        "num_res_blocks": [1, 1, 1], "norm_num_groups": 4, "norm_eps": 1e-6, "attention_levels": [False, False, False],
        "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False, "use_checkpointing": False,
        "use_convtranspose": False, "norm_float16": False, "num_splits": 2, "dim_split": 1,
    }
    torch.manual_seed(0)
    sd = build(definition).state_dict()
    torch.save({"unet_state_dict": sd}, tmp_path / "autoencoder_v1.pt")
    convert(tmp_path / "autoencoder_v1.pt", tmp_path / "ae.safetensors", definition)
    net = build(definition)
    load_into(net, tmp_path / "ae.safetensors")
    assert_same(net.state_dict(), sd)
    del sd[next(iter(sd))]
    with pytest.raises(CheckpointError, match="does not match AutoencoderKlMaisi: 1 missing key"):
        load_into(build(definition), sd, name="ae")
