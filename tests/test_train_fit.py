"""``python -m kernel.train fit`` end to end on tiny models: steps chain, checkpoints load into the kernel,
--resume continues, the NaN guard stops a diverged run, bad input gives one clear error."""
import json
import math

import pandas as pd
import pytest
import torch

from kernel.errors import KernelError
from kernel.models import build_model, load_manifest, load_weights
from kernel.train import fit as fitmod
from kernel.train.cli import main
from kernel.train.distributed import TORCHRUN_ENV, Dist, setup_distributed
from kernel.train.fit import StepRun, check_gpu_count, lr_factor
from kernel.train.nets import Trainee
from kernel.train.recipes import resolve_step
from kernel.train.smoke import make_views


@pytest.fixture(scope="module")
def views(tmp_path_factory):
    d = tmp_path_factory.mktemp("views")
    df = make_views(d, views=4, view_size=40, seed=1)
    keep = sorted(df["landmark_id"].unique())[:10]
    clean = df[df["landmark_id"].isin(keep)].groupby("landmark_id")["id"].apply(" ".join).reset_index()
    clean.columns = ["landmark_id", "images"]
    clean.to_csv(d / "train_clean.csv", index=False)
    return d, df


def _fit_args(recipe, data, out, manifest, *extra):
    """``fit`` arguments of a test run: images and labels from ``data``, no loader processes, half for validation."""
    return ["fit", "--recipe", recipe, "--data", str(data), "--images", str(data), "--out", str(out),
            "--manifest", str(manifest), "--workers", "0", "--val-fraction", "0.5", *extra]


def _fit(data, out, manifest, step, *extra):
    return main(_fit_args("effnet_b6_512", data, out, manifest, "--step", str(step), "--set", "image_size=32",
                          "--set", "batch_size=8", "--set", "epochs=2", "--set", "stop_at=null", "--random-init",
                          *extra))


def test_fit_steps_chain_and_load_into_the_kernel(views, tiny_weights, tmp_path, capsys):
    data, df = views
    _, manifest = tiny_weights
    out = tmp_path / "run"
    assert _fit(data, out, manifest, 1) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["epoch"] == 2 and 0 <= res["map100"] <= 1 and 0 <= res["gap"] <= 1 and res["n_val"] == 26
    s1 = out / "step1"
    assert {"model.pth", "last.pth", "class_map.csv", "history.jsonl"} <= {p.name for p in s1.iterdir()}
    assert len(pd.read_csv(s1 / "class_map.csv")) == 13
    # step 2 (GLDv2x: the classes of train_clean.csv) starts from step 1's model.pth
    assert _fit(data, out, manifest, 2) == 0
    rec = torch.load(out / "step2" / "model.pth", map_location="cpu", weights_only=True)
    assert len(rec["class_map"]) == 10 and rec["model"]["metric_classify.weight"].shape == (30, 512)
    assert rec["recipe"] == "effnet_b6_512" and rec["step"] == 2 and rec["arch"]["image_size"] == 32
    entry = next(e for e in load_manifest(manifest) if e["name"] == "effnet_b6_512")
    model = load_weights(build_model(dict(entry, image_size=32)), out / "step2" / "model.pth").eval()
    emb = model(torch.randn(2, 3, 32, 32))
    assert emb.shape == (2, 512) and torch.allclose(emb.norm(dim=1), torch.ones(2))
    # --resume continues after the last finished epoch
    assert _fit(data, out, manifest, 2, "--resume", "--set", "epochs=3") == 0
    hist = [json.loads(line) for line in (out / "step2" / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == [1, 2, 3]


def test_fit_errors_are_one_line(views, tiny_weights, tmp_path, capsys):
    data, _ = views
    _, manifest = tiny_weights
    assert main(["fit", "--recipe", "nope", "--step", "1", "--data", str(data), "--out", str(tmp_path)]) == 2
    assert "unknown recipe 'nope'" in capsys.readouterr().err
    assert _fit(data, tmp_path / "fresh", manifest, 2) == 2  # step 2 before step 1
    assert "train that step first or pass --init" in capsys.readouterr().err
    assert main(["fit", "--recipe", "effnet_b6_512", "--step", "1", "--data", str(tmp_path / "missing"),
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "train.csv" in err and "Traceback" not in err
    assert _fit(data, tmp_path / "r", manifest, 1, "--set", "batch_size=500") == 2
    assert "no full batch" in capsys.readouterr().err


def test_nan_guard_stops_a_diverged_run(views, tiny_weights, tmp_path, monkeypatch):
    data, df = views
    _, manifest = tiny_weights
    step = resolve_step("effnet_b6_512", 1, load_manifest(manifest), {"image_size": 32, "batch_size": 8})
    run = StepRun(step, df, df.iloc[:0], data, tmp_path / "nan", workers=0, progress=False, device="cpu",
                  random_init=True)
    monkeypatch.setattr(fitmod, "MAX_BAD_STEPS", 3)
    run.loss_fn = lambda logits, y: logits.sum() * float("nan")
    before = {k: v.clone() for k, v in run.net.state_dict().items()}
    with pytest.raises(KernelError, match="3 consecutive non-finite losses"):
        run.train_epoch(1)
    after = run.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.endswith(("running_mean", "running_var",
                                                                                 "num_batches_tracked")))


def test_lr_schedule():
    s = {"warmup_epochs": 1, "warmup_start": 0.1, "epochs": 10, "schedule": "cosine"}
    assert lr_factor(0, s, 100) == pytest.approx(0.1)
    assert lr_factor(50, s, 100) == pytest.approx(0.55)
    assert lr_factor(100, s, 100) == pytest.approx(1.0)
    assert lr_factor(550, s, 100) == pytest.approx(0.5)
    assert lr_factor(1000, s, 100) == pytest.approx(0.0, abs=1e-12)
    p = dict(s, warmup_epochs=0, schedule="poly")
    assert lr_factor(0, p, 100) == 1.0 and lr_factor(500, p, 100) == pytest.approx(0.5 ** 0.9)
    assert math.isfinite(lr_factor(10 ** 6, p, 100))


def test_hybrid_chain_swin_step_then_frozen_embedding_step(views, tiny_weights, tmp_path, capsys):
    data, _ = views
    _, manifest = tiny_weights
    out = tmp_path / "hyb"
    args = _fit_args("hybrid_b6_swin384_384", data, out, manifest, "--set", "image_size=64", "--set", "batch_size=8",
                     "--set", "data=\"gldv2\"")
    # step 1 starts from ImageNet in the recipe: without --imagenet it refuses, naming the Swin's tensors
    assert main(args + ["--step", "1", "--set", "epochs=1"]) == 2
    err = capsys.readouterr().err
    assert "step 1 needs pretrained weights" in err and "backbone.layers" in err and "--random-init" in err
    assert main(args + ["--step", "1", "--set", "epochs=1", "--random-init"]) == 0
    # step 2 swaps in the EfficientNet embedder: step 1 cannot provide it and nothing else does -> refused
    assert main(args + ["--step", "2"]) == 2
    err = capsys.readouterr().err
    n_embedder = sum(1 for k in build_model(dict(next(e for e in load_manifest(manifest)
                                                     if e["name"] == "hybrid_b6_swin384_384"))).state_dict()
                     if k.startswith("backbone.patch_embed.backbone.") and not k.endswith("num_batches_tracked"))
    assert f"needs pretrained weights that nothing provides: {n_embedder} tensors" in err
    assert "backbone.patch_embed.backbone." in err and "patch_embed.proj" not in err.split("e.g.")[1]
    assert err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err
    assert not (out / "step2" / "model.pth").exists()
    assert main(args + ["--step", "2", "--random-init"]) == 0
    s1 = torch.load(out / "step1" / "model.pth", weights_only=True)
    s2 = torch.load(out / "step2" / "model.pth", weights_only=True)
    assert s1["arch"]["family"] == "swin" and s2["arch"]["family"] == "hybrid"
    swin_params = [k for k in s1["model"] if k.startswith("backbone.layers.") and k.endswith(("weight", "bias"))]
    assert swin_params and all(torch.equal(s1["model"][k], s2["model"][k]) for k in swin_params)  # frozen
    assert torch.equal(s1["model"]["head.weight"], s2["model"]["head.weight"])
    fresh = build_model(dict(next(e for e in load_manifest(manifest) if e["name"] == "hybrid_b6_swin384_384")))
    init = fresh.state_dict()["backbone.patch_embed.proj.weight"]
    assert not torch.equal(s2["model"]["backbone.patch_embed.proj.weight"], init)  # the embedding trained
    load_weights(fresh, out / "step2" / "model.pth")


def test_block_insertion_step_names_the_inserted_block(views, tiny_weights, tmp_path, capsys):
    """Hybrid step 4 adds one EfficientNet block to the embedder: step 3's checkpoint lacks it."""
    data, _ = views
    _, manifest = tiny_weights
    out = tmp_path / "b3"
    args = _fit_args("hybrid_b3_swin224_896", data, out, manifest, "--set", "batch_size=8", "--set", "data=\"gldv2\"",
                     "--set", "epochs=1", "--set", "stop_at=null")
    entry = next(e for e in load_manifest(manifest) if e["name"] == "hybrid_b3_swin224_896")
    # step 3 runs one embedder level lower at half the size (the same token grid); its model, saved as step 3's
    # output (the tiny preset's final level is 2, so step 3 is level 1)
    size3, level3 = entry["image_size"] // 2, entry["feature_level"] - 1
    from kernel.train import checkpoint as ckpt
    from kernel.train.data import ClassMap
    from kernel.train.nets import attach_head, build_net

    net = attach_head(build_net(dict(entry, image_size=size3, feature_level=level3)), 13)
    classes = ClassMap(range(13))
    (out / "step3").mkdir(parents=True)
    ckpt.atomic_save(ckpt.model_record(net, classes, arch=dict(entry, feature_level=level3)),
                     out / "step3" / "model.pth")
    assert main(args + ["--step", "4", "--set", f"image_size={entry['image_size']}",
                        "--set", f"feature_level={entry['feature_level']}"]) == 2
    err = capsys.readouterr().err
    have = set(net.state_dict())
    new = [k for k in build_net(entry).state_dict() if k.startswith("backbone.patch_embed.backbone.")
           and k not in have and not k.endswith("num_batches_tracked")]
    assert new and f"nothing provides: {len(new)} tensors" in err and new[0] in err


def test_retrieval2020_softmax_and_cutmix_steps(views, tmp_path):
    data, df = views
    for k in (1, 2):
        step = resolve_step("retrieval2020_resnet152", k, None,
                            {"image_size": 32, "batch_size": 8, "epochs": 1, "init": "random"})
        step["arch"]["backbone"] = "test_resnet"
        run = StepRun(step, df, df.iloc[::4], data, tmp_path / f"r{k}", workers=0, progress=False, device="cpu")
        hist = run.run()
        assert math.isfinite(hist[-1]["train_loss"]) and hist[-1]["skipped_steps"] == 0
        rec = torch.load(tmp_path / f"r{k}" / "model.pth", weights_only=True)
        head = {kk for kk in rec["model"] if kk.startswith("head.")}
        assert head == ({"head.weight", "head.bias"} if k == 1 else {"head.weight"})


def test_fit_with_a_separate_validation_csv(views, tiny_weights, tmp_path, capsys):
    data, df = views
    _, manifest = tiny_weights
    val = df.groupby("landmark_id").head(2)  # two views of every photo, 3 of whose landmarks are not trained
    val.to_csv(tmp_path / "val.csv", index=False)
    rc = main(["fit", "--recipe", "effnet_b6_512", "--step", "1", "--data", str(data), "--images", str(data),
               "--train-csv", str(data / "train_clean.csv"), "--val-csv", str(tmp_path / "val.csv"),
               "--out", str(tmp_path / "v"), "--manifest", str(manifest), "--workers", "0",
               "--set", "image_size=32", "--set", "batch_size=8", "--set", "epochs=1", "--random-init"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n_val"] == 26 and res["n_queries"] == 26
    assert len(pd.read_csv(tmp_path / "v" / "step1" / "class_map.csv")) == 10  # classes = training landmarks


def test_the_2020_schedule_is_stepped_per_epoch_as_train_py():
    """haqishen train.py, B3 step 2 (--init-lr 5e-5, --n-epochs 5): GradualWarmupSchedulerV2(multiplier 10,
    total_epoch 1) then CosineAnnealingWarmRestarts(T_0=4), stepped with step(epoch - 1) at each epoch's start.
    Per epoch: 5e-5, 5e-4, 5e-4 (the after-scheduler's first value is its start), 5e-4 (1 + cos(2 pi/4))/2,
    5e-4 (1 + cos(3 pi/4))/2."""
    s = resolve_step("effnet_b3_768", 3)
    assert s["lr"] == pytest.approx(5e-4)
    want = [5e-5, 5e-4, 5e-4, 2.5e-4, 5e-4 * (1 - math.sqrt(0.5)) / 2]
    ipe = 7
    for epoch, lr in enumerate(want):
        for it in (epoch * ipe, epoch * ipe + 3, epoch * ipe + ipe - 1):  # constant within an epoch
            assert s["lr"] * lr_factor(it, s, ipe) == pytest.approx(lr, rel=1e-9), (epoch + 1, it)


def test_gpu_count_warning_and_linear_scaling(caplog):
    s = resolve_step("dolg_effnet_b7_448_s1", 2)  # 8 GPUs x 20 images
    assert check_gpu_count(s, 8) == s["lr"] and not caplog.records
    with caplog.at_level("WARNING"):
        assert check_gpu_count(s, 2) == s["lr"]
    msg = caplog.records[-1].getMessage()
    assert "8 GPUs (160 images per optimiser step)" in msg and "on 2 (40 images)" in msg
    assert "2.5e-05" in msg and "--set batch_size=80 or grad_accum=4" in msg
    assert check_gpu_count(s, 2, scale_lr=True) == pytest.approx(s["lr"] / 4)


def test_margins_count_the_whole_list_not_the_training_part():
    from kernel.train.data import ClassMap, holdout

    df = pd.DataFrame({"id": [f"i{k}" for k in range(120)], "landmark_id": [5] * 100 + [6] * 18 + [7] * 2})
    train, _ = holdout(df, 0.1)
    cm = ClassMap(train["landmark_id"])
    counts = fitmod.margin_counts(cm, cm.encode(train["landmark_id"]), df["landmark_id"])
    assert counts.tolist() == [100, 18, 2] and len(train) == 120 - 10 - 1


def test_validation_metrics_with_non_landmark_rows():
    """The 2019 test set's distractors (landmark -1): no query, no true landmark, a prediction on one is wrong."""
    from kernel.train.data import ClassMap
    from kernel.train.validation import validation_metrics

    cm = ClassMap([10, 20])
    e = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.7, 0.7]]),
                                      dim=1).numpy()
    preds = torch.tensor([[0, 0.9], [0, 0.8], [1, 0.7], [1, 0.6], [0, 0.95]]).numpy()  # class, confidence
    m = validation_metrics(["a", "b", "c", "d", "x"], [10, 10, 20, 20, -1], e, preds, cm)
    assert m["n_val"] == 5 and m["n_queries"] == 4  # the distractor is never a query
    # ranked by confidence: x (wrong), a, b, c, d (right): GAP = (1/2 + 2/3 + 3/4 + 4/5) / 4
    assert m["gap"] == pytest.approx((1 / 2 + 2 / 3 + 3 / 4 + 4 / 5) / 4)
    assert m["map100"] == pytest.approx(1.0)  # each query's one positive ranks first


def test_optimisation_trains_only_trainable_parameters_on_the_step_schedule():
    step = dict(optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="cosine", warmup_epochs=1, warmup_start=0.1,
                epochs=3)
    net = torch.nn.Linear(4, 2)
    net.bias.requires_grad = False  # frozen (train_only)
    optimizer, scheduler, scaler = fitmod.optimisation(net.parameters(), step, 5, torch.bfloat16, torch.device("cpu"))
    assert optimizer.param_groups[0]["params"] == [net.weight]
    for it in range(15):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_factor(it, step, 5))
        optimizer.step()
        scheduler.step()
    assert not scaler.is_enabled()  # bf16 needs no grad scaler; fp16 does
    assert fitmod.optimisation(net.parameters(), step, 5, torch.float16, torch.device("cpu"))[2].is_enabled()


def test_one_process_trains_the_plain_trainee(caplog):
    """Without a process group there is no DDP wrapper (nor a SyncBatchNorm warning): forward gives
    (descriptors, head logits)."""
    from kernel.train.nets import attach_head, build_net

    from tests.conftest import ROOT

    entry = next(e for e in load_manifest(ROOT / "weights_manifest.json") if e["family"] == "effnet")
    net = attach_head(build_net(dict(entry, backbone="test_efficientnet", image_size=32)), 5)
    trainee = fitmod.wrap_trainee(net, Dist(), sync_bn=True)
    assert type(trainee) is Trainee and trainee.net is net and not caplog.records
    emb, logits = trainee.eval()(torch.randn(2, 3, 32, 32))
    assert emb.shape == (2, 512) and logits.shape == (2, 5)


@pytest.mark.parametrize("device, local, want", [(None, "1", "cuda:1"), ("cuda", "1", "cuda:1"),
                                                 ("cuda:0", "1", "cuda:0"), ("cpu", "1", "cpu")])
def test_a_cuda_device_without_index_is_the_ranks_own_gpu(device, local, want, monkeypatch):
    # `fit --device cuda` on a GPU machine raised ValueError in torch.cuda.set_device (seen on an H200)
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", local)
    for var in ("WORLD_SIZE", "RANK", TORCHRUN_ENV):
        monkeypatch.delenv(var, raising=False)
    env = setup_distributed(device)
    assert env.device == torch.device(want) and not env.distributed and env.world == 1
    assert chosen == ([torch.device(want)] if want != "cpu" else [])
