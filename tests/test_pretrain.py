"""medclf pretrain (SimCLR backbone bundles), --init-from a backbone or a plain state dict, and the
linear-probe-then-fine-tune freeze schedule."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from medclf.bundle import load_bundle
from medclf.errors import BundleError
from medclf.pretrain import pretrain
from medclf.pretrain.simclr import contrastive_loss

TINY = {"size": 24, "arch": "compact-s", "batch_size": 12, "progress": False}


def test_monai_contrastive_loss_is_nt_xent():
    """The loss we rely on: identical views give a lower loss than unrelated ones, and it equals the
    NT-Xent written out (positive over all others, denominator counting the positive)."""
    torch.manual_seed(0)
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    loss = contrastive_loss(0.5)
    assert float(loss(a, a)) < float(loss(a, b))
    z = torch.nn.functional.normalize(torch.cat([a, b]), dim=1)
    sim = z @ z.T / 0.5
    sim.fill_diagonal_(float("-inf"))
    pos = torch.cat([torch.arange(6, 12), torch.arange(0, 6)])
    expected = torch.nn.functional.cross_entropy(sim, pos)
    assert float(loss(a, b)) == pytest.approx(float(expected), rel=1e-5)


@pytest.fixture(scope="module")
def backbone(sim_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pre") / "backbone"
    pretrain(sim_data, out, epochs=2, cache_dir=str(out.parent / "cache"), **TINY)
    return out


def test_backbone_bundle_verifies_and_describes_itself(backbone, sim_data):
    b = load_bundle(backbone)
    m = b.manifest
    assert m["kind"] == "backbone" and m["classes"] == []
    assert m["model"]["arch"] == "compact-s" and m["model"]["omitted"] == ["head.3.weight", "head.3.bias"]
    assert list(b.spec.input_shape) == [1, 24, 24]
    pre = m["pretraining"]
    assert pre["method"] == "simclr" and pre["epochs"] == 2 and len(pre["loss_curve"]) == 2
    assert pre["sources"][0]["path"] == str(sim_data) and pre["sources"][0]["splits"] == ["train"]
    assert len(pre["knn_probe"]["accuracy_curve"]) == 2  # the simulated data carry labels
    # No output layer in the weights: the sealed file holds the backbone only.
    from safetensors import safe_open

    with safe_open(str(backbone / "model.safetensors"), "pt") as fh:
        names = set(fh.keys())
    assert "head.3.weight" not in names and "layer4.conv1.weight" in names


def test_tampered_backbone_is_refused(backbone, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(backbone, copy)
    manifest = json.loads((copy / "bundle.json").read_text())
    manifest["pretraining"]["epochs"] = 99
    (copy / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="modified"):
        load_bundle(copy)
    # A classifier may not omit tensors: only a backbone's output layer may be missing.
    shutil.rmtree(copy)
    shutil.copytree(backbone, copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"sha256 of model\.safetensors"):
        load_bundle(copy)


def test_pretrain_refuses_test_split_and_cli_exit_code(sim_data, tmp_path):
    from medclf.errors import ConfigError

    with pytest.raises(ConfigError, match="never read"):
        pretrain(sim_data, tmp_path / "x", splits="train,test", **TINY)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "medclf",
            "pretrain",
            str(sim_data),
            "--out",
            str(tmp_path / "y"),
            "--splits",
            "test",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


def test_pretrain_killed_after_a_checkpoint_resumes(sim_data, tmp_path):
    """A run killed (SIGKILL) after its first checkpoint continues from it with --resume, keeps the first
    epoch's history and ends with the planned epochs."""
    out = tmp_path / "bb"
    ckpt = tmp_path / "bb.ckpt"
    cmd = [sys.executable, "-m", "medclf", "pretrain", str(sim_data), "--out", str(out), "--epochs", "10"]
    cmd += ["--size", "24", "--arch", "compact-s", "--batch-size", "12", "--cache-dir", str(tmp_path / "c")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ))
    try:
        deadline = time.monotonic() + 240
        while not (ckpt / "state.json").exists():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not out.exists()
    done = json.loads((ckpt / "state.json").read_text())["epoch"] + 1
    assert 1 <= done < 10
    first_loss = json.loads((ckpt / "state.json").read_text())["history"][0]["loss"]
    res = pretrain(sim_data, out, resume=True, cache_dir=str(tmp_path / "c"), progress=False)
    assert res.epochs_run == 10 and res.history[0]["loss"] == first_loss
    assert load_bundle(out).manifest["pretraining"]["epochs"] == 10
    assert not ckpt.exists()


def test_checkpoint_state_is_committed_with_its_tensors(tmp_path):
    """A kill between writing the tensors and ``state.json`` must not pair one epoch's weights with another's
    history and schedule: the state is read from the tensors file itself. A damaged file: one line."""
    from medclf.errors import ConfigError
    from medclf.pretrain.loop import LAST, STATE, STATE_KEY, load_state

    ckpt = tmp_path / "bb.ckpt"
    ckpt.mkdir()
    save_file({"net.w": torch.zeros(2)}, str(ckpt / LAST), metadata={STATE_KEY: json.dumps({"epoch": 4})})
    (ckpt / STATE).write_text(json.dumps({"epoch": 3}))  # the previous epoch's: the kill came in between
    assert load_state(ckpt) == {"epoch": 4}
    save_file({"net.w": torch.zeros(2)}, str(ckpt / LAST))  # written before the state moved into the file
    assert load_state(ckpt) == {"epoch": 3}
    (ckpt / LAST).write_bytes(b"\x00" * 64)
    with pytest.raises(ConfigError, match="the checkpoint is damaged"):
        load_state(ckpt)


def test_resume_with_another_process_count_is_refused(sim_data, tmp_path):
    """Each process's shard of every global batch depends on the process count: a checkpoint of a 2-process
    torchrun run is not resumed by one process (nor the other way round)."""
    from dataclasses import asdict

    from medclf.errors import ConfigError
    from medclf.pretrain import PretrainConfig
    from medclf.pretrain.loop import LAST, STATE_KEY

    ckpt = tmp_path / "bb.ckpt"
    ckpt.mkdir()
    config = {**asdict(PretrainConfig()), "splits": ["train"]}
    state = {"epoch": 0, "config": config, "world_size": 2}
    save_file({"net.w": torch.zeros(2)}, str(ckpt / LAST), metadata={STATE_KEY: json.dumps(state)})
    with pytest.raises(ConfigError, match=r"written by 2 process\(es\), this run has 1"):
        pretrain(sim_data, tmp_path / "bb", resume=True, progress=False)


def test_resume_without_checkpoint_is_refused(sim_data, tmp_path):
    from medclf.errors import ConfigError

    with pytest.raises(ConfigError, match="no checkpoint"):
        pretrain(sim_data, tmp_path / "none", resume=True, **TINY)


def test_plain_image_folder_is_a_source(tmp_path):
    """Unlabelled images in one folder (no class sub-folders) are enough to pretrain on."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(folder / f"{i}.png")
    res = pretrain(
        folder, tmp_path / "bb", epochs=1, cache_dir=str(tmp_path / "c"), **{**TINY, "batch_size": 4}
    )
    manifest = load_bundle(res.bundle).manifest
    assert manifest["pretraining"]["knn_probe"] is None and manifest["pretraining"]["images"] == 16


def _pngs(folder: Path, n: int) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = [folder / f"{i}.png" for i in range(n)]
    for p in paths:
        Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(p)
    return paths


def test_plain_folder_keeps_a_test_folder_out_of_training(tmp_path):
    """train/ and test/ folders without class sub-folders: the test images keep their split (pretraining reads
    only train), not every image in the training split."""
    from medclf.pretrain.data import load_unlabelled

    _pngs(tmp_path / "data" / "train", 5)
    _pngs(tmp_path / "data" / "Test", 3)
    _pngs(tmp_path / "data" / "more", 2)  # not a split's name: training images
    samples = load_unlabelled(tmp_path / "data")
    assert sorted(samples.splits) == ["test"] * 3 + ["train"] * 7


def test_a_manifest_without_labels_is_a_pretraining_source(tmp_path):
    from medclf.data.sources import load_source
    from medclf.errors import DataError
    from medclf.pretrain.data import load_unlabelled

    paths = _pngs(tmp_path / "img", 4)
    csv = tmp_path / "unlabelled.csv"
    csv.write_text(
        "path,split\n" + "".join(f"{p},{'test' if i == 0 else 'train'}\n" for i, p in enumerate(paths))
    )
    samples = load_unlabelled(csv)
    assert samples.splits == ["test", "train", "train", "train"] and (samples.labels == -1).all()
    with pytest.raises(DataError, match="needs the columns path,label"):  # training still needs labels
        load_source(csv)


def test_multilabel_source_has_no_knn_probe():
    """Multi-hot labels (ChestMNIST, an NIH manifest) give no nearest-neighbour vote; not a crash."""
    from medclf.data.samples import SampleSet
    from medclf.pretrain.data import _probe_set

    samples = SampleSet(
        refs=[f"{i}.png" for i in range(6)], labels=np.eye(3, dtype=np.int64)[[0, 1, 2, 0, 1, 2]],
        splits=["train"] * 4 + ["val"] * 2, patient_ids=[None] * 6, classes=["a", "b", "c"], source="x",
        kind="csv", root=".", task="multilabel",
    )  # fmt: skip
    assert _probe_set(samples, np.zeros((6, 1, 4, 4), np.float16), np.ones(6, bool), 0) is None


# -- --init-from a backbone or a plain state dict ------------------------------------------------------------
def test_init_from_backbone_gets_a_new_head(backbone, sim_data, tmp_path):
    from medclf.training import train

    groups = "stem,layer1,layer2,layer3,layer4"
    res = train(
        sim_data, tmp_path / "tuned", init_from=str(backbone), freeze=groups, epochs=1, progress=False
    )
    assert res.plan.init_from["kind"] == "backbone" and res.plan.spec == load_bundle(backbone).spec
    src, new = load_bundle(backbone).model.state_dict(), load_bundle(tmp_path / "tuned").model.state_dict()
    for k in src:
        if not k.startswith("head.") and src[k].is_floating_point():
            assert torch.equal(src[k], new[k]), k
    assert new["head.3.weight"].shape[0] == 3  # the simulated data's classes: a new output layer


def _torchvision_resnet_state(tmp_path: Path, *, small_input: bool = True) -> Path:
    """A ResNet-18 state dict named as torchvision names it: MONAI's own network's weights, with the
    downsampling convolutions' biases left out (torchvision has none) and DDP's ``module.`` prefix;
    ``small_input=False``: ImageNet's 7x7/2 stem, as torchvision and timm train it."""
    from medclf.models import create_model

    torch.manual_seed(3)
    net = create_model("resnet18", 1, 1000, 2, small_input=small_input)
    state = {
        f"module.{k}": v.clone()
        for k, v in net.state_dict().items()
        if not k.endswith("downsample.0.bias") and not k.endswith("num_batches_tracked")
    }
    path = tmp_path / "resnet18_torchvision.safetensors"
    save_file(state, str(path))
    return path


def test_init_from_torchvision_named_resnet_state_dict(sim_data, tmp_path):
    from medclf.training import train

    path = _torchvision_resnet_state(tmp_path)
    foreign = load_file(str(path))
    res = train(
        sim_data, tmp_path / "tuned", init_from=str(path), arch="resnet18", size=32, freeze="conv1,bn1,layer1",
        epochs=1, batch_size=16, progress=False,
    )  # fmt: skip
    assert res.plan.init_from["kind"] == "state_dict"
    new = load_bundle(tmp_path / "tuned").model.state_dict()
    assert torch.equal(new["conv1.weight"], foreign["module.conv1.weight"])
    assert torch.equal(new["layer1.0.conv2.weight"], foreign["module.layer1.0.conv2.weight"])
    assert new["fc.weight"].shape == (3, 512)  # 1000 ImageNet rows gave way to a new head


def test_a_state_dicts_7x7_stem_is_kept_at_a_small_input_size(sim_data, tmp_path):
    """At 32 px the planner would build the 3x3/1 stem; a state dict trained with ImageNet's 7x7/2 stem is
    fine-tuned with its own stem instead of refused for conv1's shape."""
    from medclf.training import train

    path = _torchvision_resnet_state(tmp_path, small_input=False)
    res = train(
        sim_data, tmp_path / "tuned", init_from=str(path), arch="resnet18", size=32, freeze="conv1,bn1",
        epochs=1, batch_size=16, progress=False,
    )  # fmt: skip
    assert res.plan.arch_kwargs["small_input"] is False
    assert any("7x7 stem" in r for r in res.plan.reasons)
    tuned = load_bundle(tmp_path / "tuned").model.state_dict()
    assert torch.equal(tuned["conv1.weight"], load_file(str(path))["module.conv1.weight"])


def test_densenet_key_map_renames_torchvision_and_timm_names():
    from medclf.models import create_model
    from medclf.models.keymaps import match_state, rename

    with torch.device("meta"):
        net = create_model("densenet121", 1, 2, 2)
    ours = net.state_dict()
    foreign = {}
    for k, v in ours.items():
        k2 = k.replace(".layers.", ".").replace("class_layers.out.", "classifier.")
        if ".denselayer1." in k2:  # old torchvision checkpoints: "norm.1" instead of "norm1"
            k2 = k2.replace(".norm1.", ".norm.1.").replace(".conv1.", ".conv.1.")
        foreign[k2] = v
    match = match_state("densenet121", net, rename("densenet121", foreign))
    assert not (match.missing or match.unexpected or match.mismatched)
    assert set(match.tensors) == set(ours)


def test_mismatched_state_dict_is_refused_in_one_line_naming_keys(sim_data, tmp_path):
    path = _torchvision_resnet_state(tmp_path)
    state = load_file(str(path))
    state["module.layer9.conv.weight"] = torch.zeros(2)
    del state["module.layer2.0.conv1.weight"]
    save_file(state, str(path))
    proc = subprocess.run(
        [sys.executable, "-m", "medclf", "train", str(sim_data), "--out", str(tmp_path / "m"), "--init-from",
         str(path), "--arch", "resnet18", "--size", "32", "--epochs", "1", "--no-progress"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(lines) == 1
    assert "missing: layer2.0.conv1.weight" in lines[0] and "unexpected: layer9.conv.weight" in lines[0]
    assert "Decoding" not in proc.stderr  # refused before any data was read


def test_unknown_incompatible_or_unreadable_state_dicts_are_refused_in_one_line(sim_data, tmp_path):
    """Another network's weights (nothing fits), the right names with a wrong shape, and a file that is no
    safetensors file: each refused in one line that names what does not fit, before any data is decoded."""
    from medclf.errors import ConfigError
    from medclf.models import create_model
    from medclf.training import train

    run = {"arch": "resnet18", "size": 32, "epochs": 1, "progress": False, "cache_dir": str(tmp_path / "c")}
    other = tmp_path / "compact.safetensors"
    save_file(create_model("compact-s", 1, 3, 2).state_dict(), str(other))
    state = load_file(str(_torchvision_resnet_state(tmp_path)))
    state["module.conv1.weight"] = torch.zeros(64, 3, *state["module.conv1.weight"].shape[2:])
    wrong_shape = tmp_path / "wrong_shape.safetensors"
    save_file(state, str(wrong_shape))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a tensor file")
    expected = {
        other: ["missing: ", "unexpected: ", " more"],
        wrong_shape: ["wrong shape: conv1.weight [64, 3, 3, 3] vs [64, 1, 3, 3]"],
        junk: ["not a readable safetensors file"],
    }
    for path, parts in expected.items():
        with pytest.raises(ConfigError) as refused:
            train(sim_data, tmp_path / "m", init_from=str(path), **run)
        message = str(refused.value)
        assert "\n" not in message and message.startswith(f"--init-from {path}"), message
        assert all(part in message for part in parts), message
    assert not (tmp_path / "c").exists()  # refused before any data was decoded


# -- the freeze schedule: linear probe, then fine-tuning ------------------------------------------------------
def test_linear_probe_freezes_the_backbone_then_fine_tunes_it(backbone, sim_data, tmp_path):
    """Epoch 1 of 3 trains the output layer only (the backbone's weights and batch-norm statistics stay
    the source's), then every layer trains, the backbone at a tenth of the head's learning rate."""
    from medclf.training import train

    src = load_bundle(backbone).model.state_dict()
    seen = []

    def record(row, model, plan):
        state = model.state_dict()
        backbone_same = all(
            torch.equal(state[k], src[k]) for k in src if not k.startswith("head.") and "num_batches" not in k
        )
        seen.append((row["phase"], backbone_same))

    res = train(
        sim_data, tmp_path / "lpft", init_from=str(backbone), linear_probe=0.34, epochs=3, progress=False,
        epoch_callback=record,
    )  # fmt: skip
    assert [s[0] for s in seen] == ["probe", "finetune", "finetune"]
    assert [s[1] for s in seen] == [True, False, False]  # frozen while probing, trained afterwards
    assert res.plan.linear_probe == pytest.approx(0.34) and res.plan.backbone_lr == pytest.approx(0.1)
    assert any("linear probe" in r for r in res.plan.reasons)


def test_planner_probes_first_for_small_data_from_supervised_sources_only(backbone, sim_data, tmp_path):
    from medclf.errors import ConfigError
    from medclf.training import train
    from medclf.training.probe import plan_probe

    # Small labelled data from a supervised source probes first; large data, or a self-supervised
    # backbone, fine-tunes every layer from the start; an explicit share wins either way.
    for kind in ("bundle", "state_dict"):
        assert plan_probe(None, 500, kind)[:2] == (pytest.approx(0.3), pytest.approx(0.1))
        assert plan_probe(None, 5000, kind)[0] == 0.0
    assert plan_probe(None, 500, "backbone")[:2] == (0.0, 1.0)
    assert plan_probe(0.3, 500, "backbone")[0] == pytest.approx(0.3)
    assert plan_probe(0, 500)[0] == 0.0
    with pytest.raises(ConfigError, match="linear-probe"):
        plan_probe(1.5, 500)
    res = train(sim_data, tmp_path / "auto", init_from=str(backbone), epochs=1, progress=False)
    assert res.plan.linear_probe == 0.0 and res.plan.backbone_lr == 1.0  # 51 images, self-supervised source
    assert any("self-supervised backbone" in r for r in res.plan.reasons)
    with pytest.raises(ConfigError, match="needs --init-from"):
        train(sim_data, tmp_path / "x", linear_probe=0.3, epochs=1, progress=False)


def test_a_backbone_has_nothing_to_predict_with(backbone, tmp_path):
    import medclf

    predictor = medclf.load_bundle(backbone)
    with pytest.raises(BundleError, match="backbone"):
        predictor.predict([np.zeros((24, 24), dtype=np.uint8)])


def test_probe_groups_give_the_backbone_a_tenth_of_the_learning_rate():
    from medclf.models import create_model
    from medclf.training.probe import param_groups

    net = create_model("compact-s", 1, 3, 2)
    head, rest = param_groups(net, 1e-3, 0.1)
    assert {id(p) for p in head["params"]} == {id(net.head[3].weight), id(net.head[3].bias)}
    assert head["lr"] == pytest.approx(1e-3) and rest["lr"] == pytest.approx(1e-4)
    assert len(head["params"]) + len(rest["params"]) == len(list(net.parameters()))


def test_info_verifies_and_shows_a_backbone(backbone, capsys):
    from medclf.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["info", str(backbone)])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "file hashes verified" in out and "kind        backbone" in out and "simclr, 2 epochs" in out


def test_a_state_dict_needs_arch(sim_data, tmp_path):
    from medclf.errors import ConfigError
    from medclf.training import train

    path = _torchvision_resnet_state(tmp_path)
    with pytest.raises(ConfigError, match="needs --arch"):
        train(sim_data, tmp_path / "m", init_from=str(path), epochs=1, progress=False)


def test_settings_that_cannot_pretrain_are_refused_in_one_line(sim_data, tmp_path):
    """A batch of one image has no negative pair; --size 0 is not the default size; a temperature so small that
    every step's loss is not finite stops the run instead of writing an untrained backbone."""
    from medclf.errors import ConfigError

    with pytest.raises(ConfigError, match="--batch-size must be at least 2"):
        pretrain(sim_data, tmp_path / "a", **{**TINY, "batch_size": 1}, epochs=1)
    with pytest.raises(ConfigError, match="--size must be at least 4"):
        pretrain(sim_data, tmp_path / "b", **{**TINY, "size": 0}, epochs=1, cache_dir=str(tmp_path / "c"))
    with pytest.raises(ConfigError, match="had a non-finite loss"):
        pretrain(sim_data, tmp_path / "d", **TINY, epochs=1, temperature=1e-30, cache_dir=str(tmp_path / "c"))
    assert not (tmp_path / "d").exists()
