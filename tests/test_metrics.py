"""uvic.metrics: the Fréchet distance, the torch-fidelity path end to end (random-weight Inception file,
digits classifier), statistics files, FID during training, and one clear message per bad input."""

import hashlib
import logging
import pickle

import numpy as np
import pytest
import scipy.linalg
import torch
from diffusers import DDPMScheduler
from PIL import Image
from safetensors.torch import load_file, save_file

from uvic import digits_classifier, feature_extractors, metric_inputs, metrics
from uvic.fid import FIDStatistics, frechet_distance
from uvic.metrics import compute_metrics, compute_statistics
from uvic.model import UViT
from uvic.pipeline import UViCPipeline


@pytest.fixture(scope="module")
def digits_rgb():
    """sklearn digits as (1797, 8, 8, 3) uint8."""
    images, _ = digits_classifier.digits_images()
    return np.repeat(images[..., None], 3, axis=-1)


def random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ---------------------------------------------------------------------- Fréchet distance
def frechet_reference(mu1, s1, mu2, s2):
    """The textbook formula with scipy's general matrix square root, float64."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


def test_frechet_distance_matches_an_independent_float64_computation():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(0)
    for d in (1, 5, 32):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = random_spd(rng, d), random_spd(rng, d)
        ours = frechet_distance(mu1, s1, mu2, s2)
        assert ours == pytest.approx(frechet_reference(mu1, s1, mu2, s2), rel=1e-9, abs=1e-9)
        tf = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, verbose=False)
        assert ours == pytest.approx(tf["frechet_inception_distance"], rel=1e-7)


def test_frechet_distance_of_gaussians_with_closed_form():
    # commuting covariances Q diag(a) Qᵀ, Q diag(b) Qᵀ: d² = ‖Δμ‖² + Σ (√a − √b)²
    rng = np.random.default_rng(1)
    d = 8
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = rng.uniform(0.1, 4, d), rng.uniform(0.1, 4, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T) == pytest.approx(expected, rel=1e-9)
    # 1-d: (μ1 − μ2)² + (σ1 − σ2)²
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
    # identical Gaussians (singular covariance too): 0
    s = np.diag([2.0, 1.0, 0.0])
    assert frechet_distance(mu1[:3], s, mu1[:3], s) == pytest.approx(0.0, abs=1e-12)


def test_frechet_distance_refuses_mismatched_statistics():
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------------- digits feature space
def test_digits_classifier_is_the_pinned_file_accurate_and_resolution_free():
    model, meta = digits_classifier.load_digits_cnn()
    assert float(meta["test_accuracy"]) >= 0.95 and int(meta["test_size"]) == 360
    assert meta["sha256"] == hashlib.sha256(digits_classifier.WEIGHTS_PATH.read_bytes()).hexdigest()
    assert meta["sha256"] == digits_classifier.WEIGHTS_SHA256
    images, labels = digits_classifier.digits_images()
    x8 = torch.from_numpy(images[:64])[:, None]  # (64, 1, 8, 8) uint8
    x16 = torch.nn.functional.interpolate(x8.float() / 255, size=16, mode="bilinear", antialias=True)
    x16 = (x16.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1)  # as uvic.data upsamples, RGB
    f8, logits8 = model(digits_classifier.to_classifier_input(x8))
    f16, _ = model(digits_classifier.to_classifier_input(x16))
    assert torch.allclose(f8, f16, atol=0.05 * f8.abs().max().item())
    assert (logits8.argmax(1).numpy() == labels[:64]).mean() > 0.9


def test_a_changed_digits_classifier_file_is_refused_and_the_recipe_still_trains_an_accurate_one(tmp_path, monkeypatch):
    meta = digits_classifier.retrain(tmp_path / "retrained.safetensors")  # the recipe, as a maintainer reruns it
    assert float(meta["test_accuracy"]) >= 0.95
    retrained, _ = digits_classifier.load_digits_cnn(tmp_path / "retrained.safetensors")  # a path given: used as is
    shipped, _ = digits_classifier.load_digits_cnn()
    x = digits_classifier.resize(torch.from_numpy(digits_classifier.digits_images()[0][:200]).float()[:, None] / 255)
    agree = (retrained(x)[1].argmax(1) == shipped(x)[1].argmax(1)).float().mean().item()
    assert agree > 0.95  # the same classifier in behaviour (bit for bit only on some machines)
    tensors = load_file(str(digits_classifier.WEIGHTS_PATH))
    next(iter(tensors.values())).view(-1)[0] += 0.01  # one weight nudged: scores would no longer be comparable
    save_file(tensors, str(tmp_path / "changed.safetensors"))
    monkeypatch.setattr(digits_classifier, "WEIGHTS_PATH", tmp_path / "changed.safetensors")
    with pytest.raises(ValueError, match="not the pinned"):  # in the shipped file's place: refused
        digits_classifier.load_digits_cnn()
    monkeypatch.setattr(digits_classifier, "WEIGHTS_PATH", tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="reinstall uvic"):
        digits_classifier.load_digits_cnn()


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_noise(digits_rgb):
    rng = np.random.default_rng(0)
    fids = []
    for sigma in (0, 25, 75):
        noisy = np.clip(digits_rgb + rng.normal(0, sigma, digits_rgb.shape), 0, 255).astype(np.uint8)
        fids.append(compute_metrics(noisy, "digits", batch_size=512)["fid"])
    assert abs(fids[0]) < 1e-6
    assert 0 < fids[1] < fids[2]


def test_digits_metrics_all_through_torch_fidelity(digits_rgb):
    half = digits_rgb[::2]
    r = compute_metrics(half, "digits", kid=True, isc=True, prc=True, kid_subset_size=200, batch_size=512)
    assert r["extractor"] == digits_classifier.EXTRACTOR_NAME
    assert (r["num_samples"], r["num_ref"]) == (899, 1797)
    assert 0 < r["fid"] < 1.0 and abs(r["kid_mean"]) < 0.05
    assert 5 < r["isc_mean"] <= 10  # ten classes, well recognised
    assert r["precision"] > 0.9 and r["recall"] > 0.7
    blank = np.zeros_like(half)  # one image repeated: no diversity, far from digits
    far = compute_metrics(blank, "digits", isc=True, batch_size=512)
    assert far["fid"] > 10 * r["fid"] and far["isc_mean"] == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------------- Inception path, random weights
@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """torch-fidelity's FeatureExtractorInceptionV3 structure with random weights, saved as a state dict."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random init
            return None

    folder = tmp_path_factory.mktemp("inception")
    torch.save({}, folder / "empty.pth")
    torch.manual_seed(0)
    net = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(folder / "empty.pth"))
    path = folder / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return path


def write_pngs(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:04d}.png")
    return folder


def test_random_weight_inception_drives_the_whole_torch_fidelity_path(random_inception, tmp_path):
    # few images: every one costs a 299x299 Inception forward on the CPU
    rng = np.random.default_rng(0)
    samples = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    ref = write_pngs(tmp_path / "ref", rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    common = dict(inception_weights=random_inception, batch_size=4, download=False, cache_root=tmp_path / "cache")
    r = compute_metrics(str(tmp_path / "samples.npz"), str(ref), kid=True, kid_subset_size=3, **common)
    assert r["extractor"] == feature_extractors.INCEPTION and (r["num_samples"], r["num_ref"]) == (4, 4)
    assert np.isfinite(r["fid"]) and np.isfinite(r["kid_mean"]) and r["fid"] > 0
    assert any((tmp_path / "cache").iterdir())  # the reference's features were cached

    stats = compute_statistics(str(ref), **common)
    assert stats.extractor == feature_extractors.INCEPTION and stats.layer == "2048" and stats.mu.shape == (2048,)
    stats.save(tmp_path / "ref_stats.npz")
    again = compute_metrics(str(tmp_path / "samples.npz"), str(tmp_path / "ref_stats.npz"), **common)
    assert again["fid"] == pytest.approx(r["fid"], rel=1e-6)

    digits_stats = FIDStatistics(np.zeros(64), np.eye(64), digits_classifier.EXTRACTOR_NAME, "features", "0")
    digits_stats.save(tmp_path / "digits_stats.npz")
    with pytest.raises(ValueError, match="do not compare"):
        compute_metrics(str(tmp_path / "samples.npz"), str(tmp_path / "digits_stats.npz"),
                        feature_extractor="inception", **common)


def test_missing_or_wrong_inception_weights_give_one_message(tmp_path):
    images = np.zeros((4, 8, 8, 3), np.uint8)
    with pytest.raises(FileNotFoundError) as err:
        compute_metrics(images, images, download=False)
    message = str(err.value)
    hub_file = tmp_path / "torch_home" / "hub" / "checkpoints" / feature_extractors.INCEPTION_WEIGHTS_FILE
    assert feature_extractors.INCEPTION_WEIGHTS_URL in message and str(hub_file) in message and "--inception-weights" in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        compute_metrics(images, images, inception_weights=tmp_path / "nope.pth")
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="does not hold inception-v3-compat weights"):
        compute_metrics(images, images, inception_weights=tmp_path / "wrong.pth")
    torch.save({"fc.weight": np.zeros(3, dtype=object)}, tmp_path / "pickled.pth")  # not tensors: never unpickled
    with pytest.raises(ValueError, match="not a plain state dict"):
        compute_metrics(images, images, inception_weights=tmp_path / "pickled.pth")


# ---------------------------------------------------------------------- statistics files
def test_statistics_files_round_trip_with_their_tags(tmp_path, digits_rgb):
    rng = np.random.default_rng(0)
    s = FIDStatistics(rng.normal(size=5), random_spd(rng, 5), "uvic-digits-cnn", "features", "abcd1234", 100)
    back = FIDStatistics.load(s.save(tmp_path / "s.npz"))
    assert np.array_equal(back.mu, s.mu) and np.array_equal(back.sigma, s.sigma)
    assert (back.extractor, back.layer, back.weights, back.num_samples) == ("uvic-digits-cnn", "features", "abcd1234", 100)

    # written statistics of the digits give FID 0 against the digits, read back from the file
    path = compute_statistics("digits").save(tmp_path / "digits.npz")
    assert compute_metrics(digits_rgb, str(path))["fid"] == pytest.approx(0.0, abs=1e-6)
    assert compute_metrics(str(path), "digits")["fid"] == pytest.approx(0.0, abs=1e-6)  # statistics on either side


def test_untagged_statistics_are_taken_as_inception_with_a_note(tmp_path, caplog, digits_rgb):
    inception = feature_extractors.Extractor(feature_extractors.INCEPTION, None, "00000000")
    with caplog.at_level(logging.WARNING, logger="uvic.feature_extractors"):
        inception.check(FIDStatistics(np.zeros(2048), np.eye(2048)), "fid_stats_cifar10_train_pytorch.npz")
    assert "no extractor tag" in caplog.text and "pytorch-fid" in caplog.text
    np.savez(tmp_path / "foreign.npz", mu=np.zeros(64), sigma=np.eye(64))  # no tags
    with pytest.raises(ValueError, match="untagged"):
        compute_metrics(digits_rgb, str(tmp_path / "foreign.npz"), feature_extractor="digits")


def test_npz_images_are_read_lazily_when_stored_uncompressed(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", arr_0=x, labels=np.arange(5))
    np.savez_compressed(tmp_path / "b.npz", arr_0=x)
    mapped = metric_inputs.npz_array(tmp_path / "a.npz")
    assert isinstance(mapped, metric_inputs.NpzMember) and np.array_equal(mapped, x) and np.array_equal(mapped[4], x[4])
    assert np.array_equal(metric_inputs.npz_array(tmp_path / "b.npz"), x)
    copy = pickle.loads(pickle.dumps(mapped))  # as DataLoader workers get it: their own stream
    assert np.array_equal(copy[3], x[3]) and np.array_equal(copy[1], x[1])  # backwards too
    item = metric_inputs.load_input(str(tmp_path / "a.npz")).images[2]
    assert item.dtype == torch.uint8 and torch.equal(item, torch.from_numpy(x[2]).permute(2, 0, 1))


# ---------------------------------------------------------------------- FID during training
def test_pipeline_fid_samples_and_scores_a_pipeline():
    torch.manual_seed(0)
    model = UViT(sample_size=8, in_channels=1, patch_size=2, embed_dim=16, depth=2, num_heads=2).eval()
    pipe = UViCPipeline(transformer=model, scheduler=DDPMScheduler(num_train_timesteps=100))
    fid = metrics.pipeline_fid(pipe, num_samples=6, ref="digits", steps=2, scheduler="ddim", batch_size=3,
                               device="cpu")
    assert np.isfinite(fid) and fid > 1.0  # an untrained model draws noise, far from digits


# ---------------------------------------------------------------------- bad input: one message each
def test_bad_inputs_give_one_clear_message(tmp_path, digits_rgb):
    ok = digits_rgb[:20]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        compute_metrics(str(tmp_path / "missing"), "digits")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no PNG"):
        compute_metrics(str(tmp_path / "empty"), "digits")
    np.savez(tmp_path / "nchw.npz", arr_0=np.zeros((4, 3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="NCHW"):
        compute_metrics(str(tmp_path / "nchw.npz"), "digits")
    with pytest.raises(ValueError, match="uint8"):
        compute_metrics(np.zeros((4, 8, 8, 3), np.float32), "digits")
    mixed = write_pngs(tmp_path / "mixed", [np.zeros((8, 8, 3), np.uint8)])
    Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(mixed / "odd.png")
    with pytest.raises(ValueError, match="different sizes"):
        compute_metrics(str(mixed), "digits")
    with pytest.raises(ValueError, match="KID draws subsets of 1000 images"):
        compute_metrics(ok, "digits", kid=True)
    np.savez(tmp_path / "stats.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(ValueError, match="needs reference images"):
        compute_metrics(ok, str(tmp_path / "stats.npz"), prc=True)
    with pytest.raises(ValueError, match="not known"):
        compute_metrics(ok, "digits", feature_extractor="resnet")
    with pytest.raises(ValueError, match="IS averages 10 splits"):
        compute_metrics(ok[:5], "digits", isc=True)


# ---------------------------------------------------------------------- resolution, bootstrap, extensions
def test_samples_and_reference_of_different_sizes_are_refused_unless_allowed(tmp_path):
    small, large = np.zeros((4, 16, 16, 3), np.uint8), np.zeros((4, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError) as err:  # before any weights are looked for
        compute_metrics(small, large, download=False)
    assert "16x16 px" in str(err.value) and "32x32 px" in str(err.value) and "--allow-resize" in str(err.value)
    with pytest.raises(FileNotFoundError, match="Inception weights are missing"):  # past the check: the weights
        compute_metrics(small, large, download=False, allow_resize=True)


def test_digits_features_are_resolution_free_so_16px_samples_score_against_8px_digits(digits_rgb):
    x16 = torch.nn.functional.interpolate(torch.from_numpy(digits_rgb[:200]).permute(0, 3, 1, 2).float(), size=16,
                                          mode="bilinear", antialias=True)
    x16 = x16.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert compute_metrics(x16, "digits", batch_size=512)["fid"] < 1.0


def test_bootstrap_interval_of_fid_over_samples_and_reference(digits_rgb):
    r = compute_metrics(digits_rgb[::4], "digits", batch_size=512, bootstrap=50, bootstrap_seed=3)
    # basic bootstrap (2·FID − quantiles): near the real-vs-real floor the resampling bias exceeds the spread,
    # so the interval may fall below the FID; it is reproducible and resamples the reference images too
    assert r["fid_low"] < r["fid_high"] and r["bootstrap_ref"] is True
    again = compute_metrics(digits_rgb[::4], "digits", batch_size=512, bootstrap=50, bootstrap_seed=3)
    assert (again["fid_low"], again["fid_high"]) == (r["fid_low"], r["fid_high"])  # seeded


def test_a_webp_folder_can_be_scored(tmp_path, digits_rgb):
    folder = tmp_path / "webp"
    folder.mkdir()
    for i, im in enumerate(digits_rgb[:20]):
        Image.fromarray(im).save(folder / f"{i:03d}.webp", lossless=True)
    r = compute_metrics(str(folder), "digits", batch_size=512)
    assert r["num_samples"] == 20 and np.isfinite(r["fid"])


# ---------------------------------------------------------------------- the reference feature cache (issue 28: 1, 8, 11)
class Hostile:
    """A pickle that creates `marker` when unpickled: what a planted cache file could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant_hostile(folder, names, marker):
    """A hostile pickle (torch.save's zip form) under every name in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        torch.save({"mu": Hostile(marker)}, folder / name)


def eval_digits(samples, ref, *extra):
    from uvic.evaluate import main as eval_main

    return eval_main([str(samples), "--ref", str(ref), "--feature-extractor", "digits", "--kid", "--kid-subset-size",
                      "10", "--batch-size", "64", "--csv", "", "--offline", *extra])


@pytest.mark.parametrize("where", ["default", "cache-root"])
def test_a_hostile_pickle_in_any_feature_cache_slot_is_never_unpickled(tmp_path, digits_rgb, uvic_cache, where,
                                                                      recwarn):
    samples, ref = tmp_path / "samples.npz", write_pngs(tmp_path / "ref", digits_rgb[:40])
    np.savez(samples, arr_0=digits_rgb[40:80])
    root = tmp_path / "cache" if where == "cache-root" else uvic_cache / "fidelity_cache"
    extra = ["--cache-root", str(root)] if where == "cache-root" else []
    before = set(root.glob("*")) if root.is_dir() else set()
    first = eval_digits(samples, ref, *extra)
    ours = sorted(set(root.glob("*")) - before)
    assert [p.suffix for p in ours] == [".safetensors", ".npz"]  # features and statistics; no .pt
    entry = ours[0].name[len("uvic-"):-len("-features.safetensors")]
    layer = feature_extractors.make_extractor("digits").layer("fid")
    fidelity_names = [f"{entry}-features-{layer}.pt", f"{entry}-stat-fid-{layer}.pt"]  # torch-fidelity's own slots
    marker = tmp_path / "marker"
    plant_hostile(root, [p.name for p in ours] + fidelity_names, marker)
    plant_hostile(tmp_path / "torch_home" / "fidelity_cache", fidelity_names, marker)  # torch-fidelity's default root
    again = eval_digits(samples, ref, *extra)
    assert not marker.exists()
    assert again["fid"] == pytest.approx(first["fid"], rel=1e-9) and again["kid_mean"] == pytest.approx(first["kid_mean"])
    missed = " ".join(str(w.message) for w in recwarn.list)
    assert all(f"{p} is not usable" in missed for p in ours)  # each hostile entry: a named cache miss
    third = eval_digits(samples, ref, *extra)  # the entries were rewritten as safetensors / npz and are used
    assert third["fid"] == pytest.approx(first["fid"], rel=1e-9) and not marker.exists()


def test_a_truncated_cache_entry_is_a_miss_and_a_full_disk_only_skips_caching(tmp_path, digits_rgb, monkeypatch):
    import errno

    from uvic import feature_cache

    ref, root = write_pngs(tmp_path / "ref", digits_rgb[:30]), tmp_path / "cache"
    first = compute_metrics(digits_rgb[30:60], str(ref), kid=True, kid_subset_size=10, cache_root=root, feature_extractor="digits")
    for path in root.iterdir():
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.warns(UserWarning, match="is not usable"):
        again = compute_metrics(digits_rgb[30:60], str(ref), kid=True, kid_subset_size=10, cache_root=root, feature_extractor="digits")
    assert again["fid"] == pytest.approx(first["fid"], rel=1e-9)

    def full(path, write):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(feature_cache, "atomic_write", full)
    with pytest.warns(UserWarning, match=r"could not write the feature cache entry .*uvic-.* \(disk full\)"):
        r = compute_metrics(digits_rgb[30:60], str(ref), cache_root=tmp_path / "full", feature_extractor="digits")
    assert r["fid"] == pytest.approx(first["fid"], rel=1e-9)


@pytest.mark.parametrize("damage, message", [
    (lambda mu, s: (mu, -s), "not positive semi-definite"),
    (lambda mu, s: (mu, np.where(np.eye(len(mu)) > 0, np.inf, s)), "non-finite"),
    (lambda mu, s: (mu, s + np.triu(np.ones_like(s), 1)), "not symmetric"),
    (lambda mu, s: (mu[:10], s), "are not (D,) and (D, D)"),
])
def test_damaged_reference_statistics_are_refused_by_name_not_scored(tmp_path, digits_rgb, capsys, damage, message):
    from uvic.evaluate import main as eval_main

    good = compute_statistics("digits")
    mu, sigma = damage(good.mu, good.sigma)
    path = tmp_path / "ref_stats.npz"
    np.savez(path, mu=mu, sigma=sigma, extractor=good.extractor, layer=good.layer, weights=good.weights)
    with pytest.raises(SystemExit) as exit_:  # a negated covariance gave FID -10.8, a non-finite one inf
        eval_main(["digits", "--ref", str(path), "--csv", ""])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and str(path) in err and message in err and "Traceback" not in err
    # the reference is a covariance: symmetric positive semi-definite, so the distance to itself is 0
    assert compute_metrics("digits", good)["fid"] == pytest.approx(0.0, abs=1e-6)


def test_a_torch_fidelity_without_an_internal_uvic_uses_gives_one_message_naming_the_range(monkeypatch, digits_rgb):
    import torch_fidelity.utils

    monkeypatch.delattr(torch_fidelity.utils, "get_featuresdict_from_dataset")
    with pytest.raises(Exception) as err:
        compute_metrics(digits_rgb[:20], "digits", cache_root=False)
    assert type(err.value).__name__ == "UserError"
    assert "torch_fidelity.utils.get_featuresdict_from_dataset" in str(err.value)
    assert feature_extractors.TORCH_FIDELITY_SUPPORTED in str(err.value)
