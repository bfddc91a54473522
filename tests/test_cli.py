"""The imbsam-fast command: smoke runs of every subcommand, loaders, losses and error messages."""

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from imbsam_fast.apps.cli import main
from imbsam_fast.apps.data.cifar import cifar_lt
from imbsam_fast.apps.data.list_file import list_file_split, read_list_file
from imbsam_fast.apps.lt_losses import make_loss


def _run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_train_smoke_writes_table_json_and_plot(capsys, tmp_path):
    rc, out, err = _run(capsys, "train", "--quiet", "--seeds", "2", "--epochs", "1",
                        "--optimizers", "sgd,imbsam,imbsam-fast,focal-sam,sam", "--out", str(tmp_path))
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["optimizer", "Many", "Medium", "Few", "All"]
    assert [ln.split()[0] for ln in lines[1:6]] == ["sgd", "imbsam", "imbsam-fast", "focal-sam", "sam"]
    data = json.loads((tmp_path / "train_digits.json").read_text())
    assert set(data["results"]) == {"sgd", "imbsam", "imbsam-fast", "focal-sam", "sam"}
    assert len(data["results"]["sgd"]) == 2 and len(data["results"]["sgd"][0]["per_class"]) == 10
    assert data["tail_classes"] == [5, 6, 7, 8, 9]
    png = (tmp_path / "train_digits.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


@pytest.mark.parametrize("loss", ["ldam", "logit_adjusted", "balanced_softmax"])
def test_train_with_long_tail_losses(capsys, tmp_path, loss):
    rc, out, err = _run(capsys, "train", "--quiet", "--seeds", "1", "--epochs", "1", "--optimizers", "imbsam",
                        "--loss", loss, "--drw-epoch", "0", "--out", str(tmp_path))
    assert rc == 0, err
    assert "loss " + loss in out


def test_anomaly_smoke(capsys, tmp_path):
    rc, out, err = _run(capsys, "anomaly", "--quiet", "--seeds", "2", "--epochs", "2", "--out", str(tmp_path))
    assert rc == 0, err
    rows = {ln.split()[0]: float(ln.split()[1]) for ln in out.splitlines()[1:4]}
    assert set(rows) == {"sgd", "sam", "imbsam"} and all(0.5 < v <= 1.0 for v in rows.values())
    assert json.loads((tmp_path / "anomaly_digits.json").read_text())["auroc"]["imbsam"]


def test_bench_smoke(capsys, tmp_path):
    rc, out, err = _run(capsys, "bench", "--reps", "1", "--skip-large", "--batches", "2", "--methods",
                        "sgd,fast,sgd-b", "--out", str(tmp_path))
    assert rc == 0, err
    assert "optimizer-side time, ResNet-32 shapes" in err and "step time" in err  # progress, as it goes
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    suites = {(r[0], r[1]) for r in rows}
    assert ("optimizer-side time", "ResNet-32 shapes") in suites
    assert {("step time, eta 20", m) for m in ("sgd", "fast", "sgd-b")} <= suites
    assert all(r[3] > 0 for r in rows)
    sgd = next(r for r in rows if r[1] == "sgd")
    assert sgd[3] == 1.0 and "total over 2 batches" in sgd[2]
    assert (tmp_path / "bench.md").read_text().startswith("Benchmarks")
    assert out.splitlines()[1].split() == ["suite", "case", "metric", "value"]


def test_bench_keeps_freed_memory_when_asked(capsys, tmp_path, monkeypatch):
    from imbsam_fast.apps.bench import allocator

    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or True)  # not this process's malloc
    rc, _, err = _run(capsys, "bench", "--quiet", "--reps", "1", "--skip-large", "--skip-step-time",
                      "--keep-freed-memory", "--out", str(tmp_path))
    assert rc == 0, err
    assert calls == [1]
    assert json.loads((tmp_path / "bench.json").read_text())["info"]["malloc"] == "keeps freed memory"
    rc, _, err = _run(capsys, "bench", "--quiet", "--reps", "1", "--skip-large", "--skip-step-time",
                      "--out", str(tmp_path))
    assert rc == 0 and calls == [1], err
    assert json.loads((tmp_path / "bench.json").read_text())["info"]["malloc"] == "default"


def test_help_for_every_subcommand_and_module_entry_point():
    for sub in ([], ["train"], ["anomaly"], ["bench"]):
        proc = subprocess.run([sys.executable, "-m", "imbsam_fast", *sub, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and "usage: imbsam-fast" in proc.stdout


@pytest.mark.parametrize("argv,message", [
    (["train", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["train", "--optimizers", "sgd,adam"], "unknown optimizer adam"),
    (["anomaly", "--optimizers", "lbfgs"], "unknown optimizer lbfgs"),
    (["train", "--dataset", "cifar100", "--data-dir", "/no/such/dir"], "--data-dir /no/such/dir does not exist"),
    (["train", "--imbalance", "0.5"], "--imbalance must be a finite number >= 1"),
    (["train", "--device", "cuda:0"], "no CUDA device"),
    (["train", "--loss", "focal"], "unknown loss 'focal'"),
    (["train", "--dataset", "list", "--data-dir", "."], "needs --train-list and --test-list"),
    (["train", "--batch-size", "0"], "--batch-size must be >= 2"),
    (["train", "--many", "10", "--few", "50"], "--few (50) must not exceed --many (10)"),
    (["train", "--lr", "nan"], "--lr must be a finite number > 0"),
    (["train", "--rho", "inf"], "--rho must be a finite number >= 0"),
    (["train", "--tail-weight", "-1"], "--tail-weight must be a finite number >= 0"),
    (["anomaly", "--eta", "nan"], "--eta must be a finite number > 0"),
])
def test_bad_input_gets_one_line_and_exit_2(capsys, argv, message):
    if "cuda" in " ".join(argv) and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    rc, out, err = _run(capsys, *argv, "--quiet", "--seeds", "1", "--epochs", "1")
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("imbsam-fast: error: ") and message in err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv", [["--batch-size", "0"], ["--many", "10", "--few", "50"], ["--lr", "nan"],
                                  ["--optimizers", "sgd,nope"], ["--image-size", "0"]])
def test_train_arguments_are_checked_before_any_training(capsys, monkeypatch, argv):
    from imbsam_fast.apps import training

    def must_not_train(*a, **k):
        raise AssertionError("trained before checking the arguments")

    monkeypatch.setattr(training, "train_on_split", must_not_train)
    rc, _, err = _run(capsys, "train", "--quiet", *argv)
    assert rc == 2 and err.startswith("imbsam-fast: error: ")


@pytest.mark.parametrize("argv,message", [
    (["--batches", "0"], "--batches must be >= 1"),
    (["--reps", "0"], "--reps must be >= 1"),
    (["--methods", "sgd,adam"], "unknown method adam"),
    (["--eta", "-1"], "--eta must be a finite number > 0"),
])
def test_bench_arguments_are_checked(capsys, argv, message):
    rc, _, err = _run(capsys, "bench", "--quiet", *argv)
    assert rc == 2 and message in err and err.count("\n") == 1


def test_missing_cifar_files_are_named(capsys, tmp_path):
    rc, _, err = _run(capsys, "train", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--quiet")
    assert rc == 2 and "data_batch_1" in err and "test_batch" in err and "no download" in err


def test_eta_without_tail_class_warns_and_trains_plainly(capsys, tmp_path):
    rc, out, err = _run(capsys, "train", "--quiet", "--seeds", "1", "--epochs", "1", "--eta", "1",
                        "--optimizers", "sgd,imbsam", "--out", str(tmp_path))
    assert rc == 0 and "leaves no tail class" in err and "plain training" in err


def test_cli_runs_as_a_console_script_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "imbsam_fast", "train", "--dataset", "nope"], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "unknown dataset" in proc.stderr


def _write_cifar(root, name, per_class_train, per_class_test, rng):
    if name == "cifar10":
        folder, classes, key = root / "cifar-10-batches-py", 10, b"labels"
        train_files, test_files = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]
    else:
        folder, classes, key = root / "cifar-100-python", 100, b"fine_labels"
        train_files, test_files = ["train"], ["test"]
    folder.mkdir(parents=True)

    def write(files, per_class):
        labels = np.repeat(np.arange(classes), per_class)
        rng.shuffle(labels)
        for i, part in enumerate(np.array_split(labels, len(files))):
            data = rng.integers(0, 256, (len(part), 3072), dtype=np.uint8)
            with open(folder / files[i], "wb") as f:
                pickle.dump({b"data": data, key: part.tolist()}, f)

    write(train_files, per_class_train)
    write(test_files, per_class_test)


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_loader_on_synthetic_pickles(tmp_path, name, classes):
    _write_cifar(tmp_path, name, 20, 3, np.random.default_rng(0))
    split = cifar_lt(name, tmp_path, imbalance=10, seed=0)
    assert split.class_counts[0] == 20 and split.class_counts[-1] == 2
    assert split.x_train.shape == (sum(split.class_counts), 3, 32, 32) and split.x_train.dtype == torch.uint8
    assert torch.bincount(split.y_train, minlength=classes).tolist() == split.class_counts
    assert split.x_test.shape == (3 * classes, 3, 32, 32)


def test_train_on_synthetic_cifar10(capsys, tmp_path):
    _write_cifar(tmp_path, "cifar10", 12, 2, np.random.default_rng(1))
    rc, out, err = _run(capsys, "train", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--imbalance", "10",
                        "--quiet", "--seeds", "1", "--epochs", "1", "--optimizers", "sgd,imbsam-fast",
                        "--batch-size", "16", "--eta", "5", "--many", "10", "--few", "5", "--out", str(tmp_path))
    assert rc == 0, err
    assert (tmp_path / "train_cifar10.json").is_file()


def _write_images(root, n_per_class, classes, size=12):
    from PIL import Image

    lines = []
    rng = np.random.default_rng(0)
    for k in range(classes):
        (root / f"c{k}").mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class[k]):
            rel = f"c{k}/img{i}.png"
            Image.fromarray(rng.integers(0, 256, (size, size + 3, 3), dtype=np.uint8)).save(root / rel)
            lines.append(f"{rel} {k}")
    return lines


def test_list_file_loader(tmp_path):
    root = tmp_path / "images"
    lines = _write_images(root, [6, 3, 1], 3)
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "test.txt").write_text("\n".join(lines[:4]) + "\n")
    split = list_file_split(root, tmp_path / "train.txt", tmp_path / "test.txt", image_size=8)
    assert split.class_counts == [6, 3, 1]
    assert split.x_train.shape == (10, 3, 8, 8) and split.x_train.dtype == torch.uint8
    assert split.y_test.tolist() == [0, 0, 0, 0]
    (tmp_path / "bad.txt").write_text("c0/img0.png zero\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        read_list_file(tmp_path / "bad.txt")
    (tmp_path / "gone.txt").write_text("c0/missing.png 0\n")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        list_file_split(root, tmp_path / "gone.txt", tmp_path / "test.txt")


def test_train_on_a_list_file_dataset(capsys, tmp_path):
    root = tmp_path / "images"
    lines = _write_images(root, [8, 4, 2], 3)
    (tmp_path / "train.txt").write_text("\n".join(lines))
    (tmp_path / "test.txt").write_text("\n".join(lines))
    rc, out, err = _run(capsys, "train", "--dataset", "list", "--data-dir", str(root), "--train-list",
                        str(tmp_path / "train.txt"), "--test-list", str(tmp_path / "test.txt"), "--image-size", "8",
                        "--quiet", "--seeds", "1", "--epochs", "1", "--optimizers", "imbsam", "--eta", "3",
                        "--many", "6", "--few", "3", "--out", str(tmp_path), "--batch-size", "4", "--workers", "0")
    assert rc == 0, err


def test_long_tail_losses_follow_their_formulas():
    counts = [100, 10, 1]
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(6, 3, generator=gen)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    n = torch.tensor(counts, dtype=torch.float32)
    torch.testing.assert_close(make_loss("ce", counts)(z, y), F.cross_entropy(z, y, reduction="none"))
    torch.testing.assert_close(make_loss("balanced_softmax", counts)(z, y),
                               F.cross_entropy(z + n.log(), y, reduction="none"))
    torch.testing.assert_close(make_loss("logit_adjusted", counts, tau=0.5)(z, y),
                               F.cross_entropy(z + 0.5 * (n / n.sum()).log(), y, reduction="none"))
    m = n.pow(-0.25)
    m = m * 0.5 / m.max()
    ldam = make_loss("ldam", counts)
    torch.testing.assert_close(ldam(z, y), F.cross_entropy(30 * (z - F.one_hot(y, 3) * m[y, None]), y,
                                                           reduction="none"))
    late = ldam(z, y, epoch=5, drw_epoch=5)
    assert not torch.allclose(late, ldam(z, y, epoch=4, drw_epoch=5))
    ratio = late / ldam(z, y)
    assert ratio[2] > ratio[1] > ratio[0]  # rarer classes weigh more after DRW
    with pytest.raises(ValueError, match="unknown loss"):
        make_loss("hinge", counts)


# ------------------------------------------------------------- training at scale


def _list_set(tmp_path, per_class=(60, 30, 10), size=20):
    root = tmp_path / "images"
    lines = _write_images(root, list(per_class), len(per_class), size=size)
    (tmp_path / "train.txt").write_text("\n".join(lines))
    (tmp_path / "test.txt").write_text("\n".join(lines[::4]))
    return ["--dataset", "list", "--data-dir", str(root), "--train-list", str(tmp_path / "train.txt"),
            "--test-list", str(tmp_path / "test.txt"), "--image-size", "16", "--eta", "20", "--many", "50",
            "--few", "20"]


def test_list_images_stream_with_crops_and_flips(tmp_path):
    from imbsam_fast.apps.data.streaming import ListImages

    _list_set(tmp_path, per_class=(4, 2, 1))
    train = ListImages(tmp_path / "images", tmp_path / "train.txt", 16, train=True)
    test = ListImages(tmp_path / "images", tmp_path / "test.txt", 16, train=False)
    assert len(train) == 7 and train.labels.tolist() == [0, 0, 0, 0, 1, 1, 2]
    x, y = train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8 and y == 0
    torch.manual_seed(0)
    crops = {tuple(train[0][0].flatten()[:8].tolist()) for _ in range(6)}
    assert len(crops) > 1, "training items should differ from draw to draw"
    assert torch.equal(test[0][0], test[0][0])
    loader = torch.utils.data.DataLoader(train, batch_size=3, num_workers=2)
    assert sum(len(b[1]) for b in loader) == 7


def test_resume_continues_where_the_checkpoint_left_off(capsys, tmp_path, monkeypatch):
    from imbsam_fast.apps import fit as fit_module

    data = _list_set(tmp_path, per_class=(12, 6, 2))
    common = [*data, "--quiet", "--seeds", "1", "--optimizers", "imbsam", "--batch-size", "4", "--workers", "0",
              "--model", "resnet32", "--epochs", "2"]
    straight, split_run = tmp_path / "straight", tmp_path / "split"
    assert _run(capsys, "train", *common, "--out", str(straight))[0] == 0
    save = fit_module._save

    def save_then_stop(*args):
        save(*args)
        raise KeyboardInterrupt  # the job is killed right after its first checkpoint

    monkeypatch.setattr(fit_module, "_save", save_then_stop)
    assert _run(capsys, "train", *common, "--out", str(split_run))[0] == 130
    monkeypatch.setattr(fit_module, "_save", save)
    assert torch.load(split_run / "checkpoint_list_imbsam_seed0.pt", weights_only=False)["epoch"] == 0
    rc, _, err = _run(capsys, "train", *common, "--resume", "--out", str(split_run))
    assert rc == 0, err
    name = "checkpoint_list_imbsam_seed0.pt"
    a, b = (torch.load(d / name, weights_only=False) for d in (straight, split_run))
    assert a["epoch"] == b["epoch"] == 1 and a["steps"] == b["steps"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_scale_options_reach_the_optimizer(capsys, tmp_path, monkeypatch):
    from imbsam_fast import ImbSAM

    seen = []
    real_step = ImbSAM.step

    def spy(self, closure=None, targets=None, **kw):
        seen.append((self.max_grad_norm, kw.get("micro_batches"), kw.get("scaler") is not None))
        return real_step(self, closure, targets, **kw)

    monkeypatch.setattr(ImbSAM, "step", spy)
    rc, out, err = _run(capsys, "train", "--quiet", "--seeds", "1", "--epochs", "1", "--optimizers", "imbsam-fast",
                        "--micro-batches", "2", "--max-grad-norm", "5", "--fp16", "--workers", "0", "--out",
                        str(tmp_path))
    assert rc == 0, err
    assert seen and set(seen) == {(5.0, 2, True)}


def test_public_recipe_sets_the_public_code_setup(capsys, tmp_path, monkeypatch):
    from imbsam_fast.apps import fit as fit_module
    from imbsam_fast.apps.models import ResNet34

    _write_cifar(tmp_path, "cifar100", 5, 1, np.random.default_rng(2))
    calls = []

    def record(name, model_fn, train_set, test_set, counts, cfg, **kw):
        calls.append((name, model_fn(), cfg))
        raise SystemExit(0)

    monkeypatch.setattr(fit_module, "fit", record)
    with pytest.raises(SystemExit):
        main(["train", "--recipe", "public", "--data-dir", str(tmp_path), "--quiet", "--optimizers", "imbsam"])
    name, model, cfg = calls[0]
    assert isinstance(model, ResNet34)
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.batch_size, cfg.schedule, cfg.rho, cfg.eta,
            cfg.tail_weight, cfg.epochs) == (0.01, 0.9, 1e-3, 64, "epoch", 0.05, 20.0, 2.0, 200)
    rc, _, err = _run(capsys, "train", "--recipe", "public", "--dataset", "digits")
    assert rc == 2 and "CIFAR-100-LT" in err


def test_resnet34_has_torchvisions_layout():
    from imbsam_fast.apps.models import resnet34

    model = resnet34(100)
    assert sum(p.numel() for p in model.parameters()) == 21_335_972
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    try:
        import torchvision
    except Exception:  # torchvision does not import beside the CPU torch build
        return
    reference = torchvision.models.resnet34(num_classes=100)
    theirs, ours = reference.state_dict(), model.state_dict()
    assert list(ours) == list(theirs) and all(ours[k].shape == theirs[k].shape for k in ours)
    model.load_state_dict(theirs)
    model.eval()
    reference.eval()
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(model(x), reference(x))
    for name in ("resnet50", "resnext50"):
        from imbsam_fast.apps.models import make_backbone

        assert make_backbone(name, 100)(x).shape == (4, 100)


def test_torchrun_two_processes_train_a_list_set(tmp_path):
    data = _list_set(tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "imbsam_fast", "train", *data, "--seeds", "1", "--epochs", "1", "--optimizers", "imbsam-fast",
           "--batch-size", "8", "--workers", "1", "--model", "resnet32", "--quiet", "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("optimizer") == 1, "only rank 0 prints the table"
    assert "per process x 2" in proc.stdout
    result = json.loads((tmp_path / "out" / "train_list.json").read_text())
    assert result["processes"] == 2
    # 100 images, 2 processes, batch 8: 6 full batches per process.
    assert result["results"]["imbsam-fast"][0]["steps"] == 6
