"""Weights by published name (``hf-hub:ORG/NAME``, ``torchvision:MODEL.ENTRY``), offline.

Nothing here downloads: the Hugging Face cache is built in tmp_path in huggingface_hub's own
layout (``models--org--name/blobs``, ``snapshots/<commit>/``, ``refs/main``; checked with
``huggingface_hub.scan_cache_dir``) and read with ``HF_HUB_OFFLINE=1``; torch.hub's
``checkpoints/`` directory is filled by hand, or by torch.hub's own download from a
``file://`` URL put in place of torchvision's.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import flax_resnet
from flax_resnet import convert_cli, named_weights, train_cli
from flax_resnet.named_weights import ChecksumError, NamedWeightsError, NotCachedError
from flax_resnet.prediction import class_names
from flax_resnet.preprocessing import Preprocessing
from flax_resnet.transforms import EvalTransform
from parity_tests.harness import LOGIT_RTOL, randomize_norms_, rel_err

TIMM_REPO = "acme/resnet18-tiny.in1k"
HF_REPO = "acme/resnet-tiny"
COMMIT = hashlib.sha1(b"first").hexdigest()  # Hub commits are 40 hex digits
OTHER_COMMIT = hashlib.sha1(b"second").hexdigest()
X = np.random.default_rng(3).standard_normal((2, 3, 33, 35)).astype(np.float32)
TV_ENTRY = "ResNet18_Weights.IMAGENET1K_V1"  # published as resnet18-f37072fd.pth


def torch_logits(model: torch.nn.Module) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.from_numpy(X))
    return getattr(out, "logits", out).numpy()


def flax_logits(model) -> np.ndarray:
    model.eval()
    return np.asarray(model(jnp.asarray(X.transpose(0, 2, 3, 1))))


HF_LABELS = ("cat", "dog", "fox", "owl", "yak")


def put_in_hub_cache(cache: Path, repo_id: str, files: dict[str, Path], commit: str,
                     ref: str | None = "main") -> Path:
    """``files`` as huggingface_hub stores a download: content-addressed blobs, a snapshot
    of symlinks per commit, a ref naming the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for name, src in files.items():
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return repo


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small timm ResNet-18 (save_for_hf), a small Hugging Face ResNet (save_pretrained,
    with a preprocessor_config.json of its own) and a torchvision ResNet-18 state_dict, with
    random weights and BatchNorm statistics, and their logits."""
    import timm
    import torchvision
    from timm.models import save_for_hf
    from transformers import ResNetConfig, ResNetForImageClassification

    root = tmp_path_factory.mktemp("saved")
    torch.manual_seed(0)
    timm_model = timm.create_model("resnet18", pretrained=False, num_classes=7,
                                   channels=(8, 16, 32, 64))
    randomize_norms_(timm_model, 1)
    save_for_hf(timm_model.eval(), root / "timm", safe_serialization=True)
    hf_model = ResNetForImageClassification(ResNetConfig(
        num_labels=5, layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[8, 16, 32, 64],
        embedding_size=8, id2label=dict(enumerate(HF_LABELS))))
    randomize_norms_(hf_model, 2)
    hf_model.eval().save_pretrained(root / "hf")
    (root / "hf" / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 224},
        "crop_pct": 0.875, "resample": 3, "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5]}))
    tv_model = torchvision.models.resnet18()
    randomize_norms_(tv_model, 3)
    torch.save(tv_model.eval().state_dict(), root / "tv.pth")
    return {"root": root, "timm": torch_logits(timm_model), "hf": torch_logits(hf_model),
            "tv": torch_logits(tv_model),
            "tv_sha256": hashlib.sha256((root / "tv.pth").read_bytes()).hexdigest()}


@pytest.fixture(autouse=True)
def caches(tmp_path, monkeypatch):
    """Empty caches of this test's own, offline; torchvision's published URL never used."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub read the variable at import: its own guard holds whatever the caller set
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return {"hf": tmp_path / "hf-cache", "torch": tmp_path / "torch-home" / "hub" / "checkpoints"}


@pytest.fixture()
def hub(saved, caches):
    """The Hub cache holding the timm repo (main and a second, pinned-only commit) and the
    Hugging Face repo."""
    timm_dir, hf_dir = saved["root"] / "timm", saved["root"] / "hf"
    put_in_hub_cache(caches["hf"], TIMM_REPO, {
        "config.json": timm_dir / "config.json",
        "model.safetensors": timm_dir / "model.safetensors"}, COMMIT)
    put_in_hub_cache(caches["hf"], HF_REPO, {
        name: hf_dir / name for name in ("config.json", "model.safetensors",
                                         "preprocessor_config.json")}, COMMIT)
    return caches["hf"]


def tv_entry():
    import torchvision

    return torchvision.models.get_weight(TV_ENTRY)


def published_file() -> str:
    return os.path.basename(tv_entry().url)


def named_like_torchvision(saved, monkeypatch, url_dir: str = "https://download.pytorch.org/"
                           "models") -> str:
    """torchvision's entry pointed at a file name carrying the real SHA-256 prefix of the
    test's file (the published name's prefix is that of the published weights)."""
    name = f"resnet18-{saved['tv_sha256'][:8]}.pth"
    monkeypatch.setattr(tv_entry().value, "url", f"{url_dir}/{name}")
    return name


# --- the Hugging Face Hub ------------------------------------------------------------------


def test_the_cache_is_in_huggingface_hubs_layout(hub):
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(hub)
    assert not info.warnings, info.warnings
    repos = {r.repo_id: r for r in info.repos}
    assert set(repos) == {TIMM_REPO, HF_REPO}
    (revision,) = repos[TIMM_REPO].revisions
    assert revision.commit_hash == COMMIT and revision.refs == {"main"}
    assert {f.file_name for f in revision.files} == {"config.json", "model.safetensors"}


def test_timm_repo_by_name_gives_the_torch_logits(saved, hub):
    model, config = flax_resnet.load(f"hf-hub:{TIMM_REPO}")
    # Same tolerance and reason as the forward parity tests (harness.LOGIT_RTOL); measured
    # 1.4e-7 here.
    assert rel_err(flax_logits(model), saved["timm"]) <= LOGIT_RTOL
    assert (config["depth"], config["num_classes"], config["width"]) == (18, 7, 0.125)
    w = flax_resnet.resolve(f"hf-hub:{TIMM_REPO}")
    pinned = f"hf-hub:{TIMM_REPO}@{COMMIT}"
    assert (w.kind, w.source) == ("timm", f"hf-hub:{TIMM_REPO}")
    assert dict(w.origin) == {"source": "hf-hub", "name": pinned, "repo_id": TIMM_REPO,
                              "revision": "main", "commit": COMMIT,
                              "files": ("config.json", "model.safetensors")}
    assert w.description.startswith(f"{pinned} (timm directory {hub}")
    timm_cfg = json.loads((saved["root"] / "timm" / "config.json").read_text())
    assert w.preprocessing.mean == tuple(timm_cfg["pretrained_cfg"]["mean"])
    assert w.preprocessing.source == f"timm pretrained_cfg of {pinned}"


def test_a_pinned_revision_reads_its_own_snapshot(saved, hub):
    other = saved["root"] / "other"
    other.mkdir(exist_ok=True)
    (other / "config.json").write_text(json.dumps(
        {**json.loads((saved["root"] / "timm" / "config.json").read_text()),
         "pretrained_cfg": {"mean": [0.1, 0.2, 0.3], "std": [1, 1, 1]}}))
    put_in_hub_cache(hub, TIMM_REPO, {
        "config.json": other / "config.json",
        "model.safetensors": saved["root"] / "timm" / "model.safetensors"}, OTHER_COMMIT,
        ref=None)
    at_main = flax_resnet.resolve(f"hf-hub:{TIMM_REPO}@main")
    pinned = flax_resnet.resolve(f"hf-hub:{TIMM_REPO}@{OTHER_COMMIT}")
    assert (at_main.origin["commit"], pinned.origin["commit"]) == (COMMIT, OTHER_COMMIT)
    assert pinned.origin["revision"] == OTHER_COMMIT
    assert pinned.preprocessing.mean == (0.1, 0.2, 0.3) != at_main.preprocessing.mean
    with pytest.raises(NotCachedError) as err:
        flax_resnet.resolve(f"hf-hub:{TIMM_REPO}@v2")
    assert str(hub / "models--acme--resnet18-tiny.in1k") in str(err.value)
    assert "--revision v2" in str(err.value)


def test_hf_transformers_repo_by_bare_name(saved, hub):
    w = flax_resnet.resolve(HF_REPO)  # no prefix, no such path: a Hub name
    assert (w.kind, w.origin["commit"]) == ("hf", COMMIT)
    assert w.origin["files"] == ("config.json", "model.safetensors", "preprocessor_config.json")
    assert w.preprocessing.mean == (0.5, 0.5, 0.5)  # its preprocessor_config.json's
    assert w.preprocessing.source == (f"hf-hub:{HF_REPO}@{COMMIT}/preprocessor_config.json")
    # Same tolerance as above; measured 2.5e-7 here.
    assert rel_err(flax_logits(w.build()), saved["hf"]) <= LOGIT_RTOL
    assert class_names(w) == HF_LABELS  # the cached snapshot's id2label


def test_an_existing_path_wins_over_a_hub_name(saved, hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = tmp_path / HF_REPO
    local.parent.mkdir()
    local.symlink_to(saved["root"] / "timm")  # a timm dir where the Hub has an hf one
    w = flax_resnet.resolve(HF_REPO)
    assert (w.kind, dict(w.origin)) == ("timm", {})
    assert w.description == f"timm directory {HF_REPO}"


def test_offline_with_nothing_cached_names_the_cache_folder(caches):
    folder = caches["hf"] / "models--acme--nothing"
    with pytest.raises(NotCachedError) as err:
        flax_resnet.resolve("hf-hub:acme/nothing")
    text = str(err.value)
    assert str(folder) in text and "HF_HUB_OFFLINE is set" in text, text
    assert f"hf download acme/nothing config.json model.safetensors --cache-dir " \
           f"{caches['hf']}" in text, text
    with pytest.raises(NotCachedError) as err:  # bare: it might have been a path
        flax_resnet.resolve("acme/nothing")
    assert str(err.value).startswith("no such file or directory: acme/nothing; as a Hugging "
                                     "Face Hub name"), err.value
    assert str(folder) in str(err.value)
    with pytest.raises(ValueError, match="no such file or directory: acme/nothing.pth$"):
        flax_resnet.resolve("acme/nothing.pth")  # a weight file's name is a path


def test_cached_config_without_weights_names_the_weight_files(saved, caches):
    put_in_hub_cache(caches["hf"], "acme/half", {
        "config.json": saved["root"] / "timm" / "config.json"}, COMMIT)
    with pytest.raises(NotCachedError) as err:
        flax_resnet.resolve("hf-hub:acme/half")
    text = str(err.value)
    assert "model.safetensors, pytorch_model.bin not in the Hugging Face cache" in text, text
    assert f"--revision {COMMIT}" in text and str(caches["hf"] / "models--acme--half") in text


def test_a_hub_repo_that_is_no_resnet_is_refused_before_its_weights(tmp_path, caches):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "vit", "hidden_size": 768}))
    put_in_hub_cache(caches["hf"], "acme/vit", {"config.json": config}, COMMIT)
    # only config.json is cached: the refusal comes before any weights are looked for
    with pytest.raises(ValueError, match=r"^hf-hub:acme/vit@[0-9a-f]{40}: model_type 'vit' is "
                                         r"not supported; only Hugging Face's 'resnet'"):
        flax_resnet.resolve("hf-hub:acme/vit")


@pytest.fixture()
def fake_hub(monkeypatch):
    """A Hub endpoint on 127.0.0.1 speaking the part of the Hub's protocol hf_hub_download
    uses (HEAD: X-Repo-Commit, ETag, Content-Length; GET: the bytes; 404 with X-Error-Code
    EntryNotFound / RevisionNotFound / RepoNotFound), logging every request; online mode."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from huggingface_hub import constants

    repos: dict[str, dict[str, bytes]] = {}
    log: list[tuple[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, body: bool) -> None:
            log.append((self.command, self.path))
            org, name, resolve, revision, filename = self.path.lstrip("/").split("/", 4)
            files = repos.get(f"{org}/{name}")
            error = ("RepoNotFound" if files is None or resolve != "resolve" else
                     "RevisionNotFound" if revision not in ("main", COMMIT) else
                     "EntryNotFound" if filename not in files else None)
            data = b"" if error else files[filename]
            self.send_response(404 if error else 200)
            self.send_header("X-Repo-Commit", COMMIT)
            if error:
                self.send_header("X-Error-Code", error)
            else:
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def do_HEAD(self) -> None:  # noqa: N802 - http.server's names
            self._answer(body=False)

        def do_GET(self) -> None:  # noqa: N802
            self._answer(body=True)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield repos, log
    server.shutdown()
    server.server_close()


def test_online_each_file_is_fetched_once_into_the_cache(saved, caches, fake_hub, tmp_path,
                                                         monkeypatch):
    from safetensors.torch import load_file

    repos, log = fake_hub
    hf_dir = saved["root"] / "hf"
    weights = tmp_path / "pytorch_model.bin"  # a repo without safetensors: the .bin fallback
    torch.save(load_file(hf_dir / "model.safetensors"), weights)
    repos[HF_REPO] = {"config.json": (hf_dir / "config.json").read_bytes(),
                      "pytorch_model.bin": weights.read_bytes(),
                      "tf_model.h5": b"never fetched"}
    first = flax_resnet.resolve(f"hf-hub:{HF_REPO}")
    gets = sorted(path.rsplit("/", 1)[1] for method, path in log if method == "GET")
    assert gets == ["config.json", "pytorch_model.bin"], log  # nothing else
    log.clear()
    second = flax_resnet.resolve(f"hf-hub:{HF_REPO}")
    # the second call only asks which commit main is; the files, and the files the repo does
    # not have (huggingface_hub's .no_exist), come from the cache
    assert log == [("HEAD", f"/{HF_REPO}/resolve/main/config.json")], log
    assert first.origin == second.origin
    assert first.origin["files"] == ("config.json", "pytorch_model.bin")
    assert first.origin["commit"] == COMMIT and first.kind == "hf"
    assert first.preprocessing.source.startswith("ImageNet constants assumed for "
                                                 f"hf-hub:{HF_REPO}@{COMMIT}")
    # Same tolerance as above; measured 2.6e-7 here.
    assert rel_err(flax_logits(second.build()), saved["hf"]) <= LOGIT_RTOL
    # What was fetched serves offline too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    log.clear()
    assert flax_resnet.resolve(f"hf-hub:{HF_REPO}").origin == first.origin and not log
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(NamedWeightsError, match="no such model repository on the Hugging "
                                                "Face Hub"):
        flax_resnet.resolve("hf-hub:acme/absent")
    with pytest.raises(NamedWeightsError, match="has no revision 'v9'"):
        flax_resnet.resolve(f"hf-hub:{HF_REPO}@v9")


# --- torchvision ---------------------------------------------------------------------------


def test_torchvision_name_loads_the_checked_file(saved, caches, monkeypatch):
    name = named_like_torchvision(saved, monkeypatch)
    caches["torch"].mkdir(parents=True)
    (caches["torch"] / name).write_bytes((saved["root"] / "tv.pth").read_bytes())
    w = flax_resnet.resolve("torchvision:resnet18.IMAGENET1K_V1")
    assert (w.kind, w.naming) == ("file", "torchvision")
    assert dict(w.origin) == {
        "source": "torchvision", "name": "torchvision:resnet18.IMAGENET1K_V1",
        "weights": TV_ENTRY, "url": f"https://download.pytorch.org/models/{name}",
        "file": name, "sha256": saved["tv_sha256"]}
    pre = w.preprocessing  # V1: torchvision's defaults, resize 256 for the 224 crop
    assert (pre.input_size, pre.resize_size, pre.interpolation) == ((3, 224, 224), 256,
                                                                    "bilinear")
    assert saved["tv_sha256"] in pre.source and TV_ENTRY in pre.source
    # Same tolerance as above; measured 1.4e-7 here.
    assert rel_err(flax_logits(w.build()), saved["tv"]) <= LOGIT_RTOL
    # The model name alone is its DEFAULT entry, and case does not matter.
    assert flax_resnet.resolve("torchvision:ResNet18").origin == w.origin


def test_a_torchvision_file_failing_its_checksum_is_named(saved, caches):
    caches["torch"].mkdir(parents=True)
    path = caches["torch"] / published_file()  # resnet18-f37072fd.pth: not this content
    path.write_bytes((saved["root"] / "tv.pth").read_bytes())
    with pytest.raises(ChecksumError) as err:
        flax_resnet.resolve("torchvision:resnet18.IMAGENET1K_V1")
    assert err.value.path == str(path)
    assert str(path) in str(err.value) and saved["tv_sha256"] in str(err.value)
    assert path.exists()  # named, not deleted behind the user's back


def test_torchvision_download_goes_to_torch_hub_once_and_is_checked(saved, caches, tmp_path,
                                                                    monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    name = named_like_torchvision(saved, monkeypatch, served.as_uri())
    (served / name).write_bytes((saved["root"] / "tv.pth").read_bytes())
    downloads = []
    real = torch.hub.download_url_to_file
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda url, dst, **kw: downloads.append(url) or real(url, dst, **kw))
    first = flax_resnet.resolve("torchvision:resnet18.IMAGENET1K_V1")
    second = flax_resnet.resolve("torchvision:resnet18.IMAGENET1K_V1")
    assert downloads == [(served / name).as_uri()]
    assert sorted(os.listdir(caches["torch"])) == [name]
    assert first.origin == second.origin and first.origin["sha256"] == saved["tv_sha256"]
    # A served file that is not what its name promises is not kept.
    wrong = "resnet18-00000000.pth"
    (served / wrong).write_bytes((saved["root"] / "tv.pth").read_bytes())
    monkeypatch.setattr(tv_entry().value, "url", (served / wrong).as_uri())
    with pytest.raises(ChecksumError, match="nothing was kept at .*resnet18-00000000.pth"):
        flax_resnet.resolve("torchvision:resnet18.IMAGENET1K_V1")
    assert sorted(os.listdir(caches["torch"])) == [name]
    # Nothing to download from: the path to fill and the URL to fill it from.
    gone = (tmp_path / "nowhere" / name).as_uri()
    monkeypatch.setattr(tv_entry().value, "url", gone)
    os.remove(caches["torch"] / name)
    with pytest.raises(NotCachedError) as err:
        flax_resnet.resolve("torchvision:resnet18.IMAGENET1K_V1")
    assert str(caches["torch"] / name) in str(err.value) and gone in str(err.value)


def test_unknown_torchvision_entries_list_the_allowed_names():
    with pytest.raises(NamedWeightsError) as err:
        flax_resnet.resolve("torchvision:resnet18.IMAGENET1K_V9")
    assert "no entry 'IMAGENET1K_V9' for resnet18; allowed: resnet18.IMAGENET1K_V1" in \
        str(err.value)
    with pytest.raises(NamedWeightsError) as err:
        flax_resnet.resolve("torchvision:vit_b_16.IMAGENET1K_V1")
    text = str(err.value)
    assert "'vit_b_16' is no torchvision ResNet" in text
    for entry in ("resnet50.IMAGENET1K_V2", "resnext101_64x4d.IMAGENET1K_V1",
                  "wide_resnet101_2.IMAGENET1K_V2"):
        assert entry in text, text


def test_torchvision_v2_preprocessing_is_torchvisions():
    import torchvision

    entry = torchvision.models.get_weight("ResNet50_Weights.IMAGENET1K_V2")
    pre = named_weights._torchvision_preprocessing(entry, "test")
    assert (pre.input_size, pre.resize_size, pre.interpolation) == ((3, 224, 224), 232,
                                                                    "bilinear")
    assert (pre.mean, pre.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert EvalTransform.from_preprocessing(pre) == EvalTransform(224, 232, "bilinear")
    assert Preprocessing.from_dict(json.loads(json.dumps(pre.to_dict()))) == pre


def test_torchvision_names_without_torchvision(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    with pytest.raises(NamedWeightsError, match=r"install torchvision \(pip install"):
        flax_resnet.resolve("torchvision:resnet50.IMAGENET1K_V2")
    assert convert_cli.main(["torchvision:resnet50", str(tmp_path / "out")]) == 2
    assert "install torchvision" in capsys.readouterr().err


# --- the command lines ---------------------------------------------------------------------


def test_converter_cli_takes_names(saved, hub, caches, tmp_path, monkeypatch, capsys):
    published = published_file()
    out = tmp_path / "timm_flax"
    assert convert_cli.main([f"hf-hub:{TIMM_REPO}", str(out)]) == 0
    recorded = json.loads((out / "preprocessing.json").read_text())
    assert recorded["source"] == f"timm pretrained_cfg of hf-hub:{TIMM_REPO}@{COMMIT}"
    model, _ = flax_resnet.load(out)
    assert rel_err(flax_logits(model), saved["timm"]) <= LOGIT_RTOL
    origin = json.loads((out / "origin.json").read_text())
    assert (origin["repo_id"], origin["commit"]) == (TIMM_REPO, COMMIT), origin
    # converted again (to a timm directory): the first source is still the one named
    assert convert_cli.main([str(out), str(tmp_path / "again"), "--to", "timm"]) == 0
    assert json.loads((tmp_path / "again" / "origin.json").read_text()) == origin
    name = named_like_torchvision(saved, monkeypatch)
    caches["torch"].mkdir(parents=True)
    (caches["torch"] / name).write_bytes((saved["root"] / "tv.pth").read_bytes())
    assert convert_cli.main(["torchvision:resnet18.IMAGENET1K_V1", str(tmp_path / "tv")]) == 0
    recorded = json.loads((tmp_path / "tv" / "preprocessing.json").read_text())
    assert recorded["resize_size"] == 256 and saved["tv_sha256"] in recorded["source"]
    origin = json.loads((tmp_path / "tv" / "origin.json").read_text())
    assert origin["sha256"] == saved["tv_sha256"] and origin["url"].endswith(name), origin
    capsys.readouterr()
    # the published name: the file there fails its name's checksum
    (caches["torch"] / name).rename(caches["torch"] / published)
    monkeypatch.setattr(tv_entry().value, "url", f"https://download.pytorch.org/models/"
                        f"{published}")
    for src, says in (("hf-hub:acme/nothing", str(caches["hf"] / "models--acme--nothing")),
                      ("torchvision:resnet18.IMAGENET1K_V1", published),
                      ("torchvision:resnet18.V9", "resnet18.IMAGENET1K_V1")):
        dst = tmp_path / "never"
        assert convert_cli.main([src, str(dst)]) == 2, src
        err = capsys.readouterr().err
        assert err.startswith("error: ") and says in err and "Traceback" not in err, err
        assert not dst.exists()


def test_train_cli_init_from_a_name_that_is_not_there_exits_2(caches, tmp_path, capsys):
    code = train_cli.main(["--init-from", "hf-hub:acme/nothing", "--dataset", "synthetic",
                           "--workdir", str(tmp_path / "run"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "init-from" in err and str(caches["hf"] / "models--acme--nothing") in err, err
    assert "Traceback" not in err
