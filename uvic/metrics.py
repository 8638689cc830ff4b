"""FID, IS, KID and precision/recall through torch-fidelity, of one MetricInput against another (uvic.metric_inputs),
in one extractor's feature space (uvic.feature_extractors); the Fréchet distance and statistics files are uvic.fid.

The FID convention is torch-fidelity's: its "inception-v3-compat" network reproduces the TensorFlow Inception graph
of the original FID code (TTUR) and of the ADM evaluator, image resize included; FID uses its 2048-d pool features,
IS its logits, and KID and precision/recall (k = 3 neighbours, as in the ADM evaluator) the same 2048-d features, so
one network serves every metric. Offline, the digits demo is scored in the 64-d feature space of a small digits
classifier instead (uvic.digits_classifier, registered with torch-fidelity as "uvic-digits-cnn").
"""

from __future__ import annotations

import contextlib
import tempfile
from typing import Dict, Optional, Sequence

import torch
from torch_fidelity import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD

from . import digits_classifier
from .feature_cache import FeatureCache
from .feature_extractors import Extractor, fidelity, make_extractor
from .fid import FIDStatistics, bootstrap_fid, frechet_distance, kid_with_se
from .metric_inputs import MetricInput, check_resolution, choose_extractor, load_input
from .sample_sets import generate_samples


KID_SUBSET_SIZE = 1000  # torch-fidelity's default
PRC_NEIGHBORHOOD = 3
ISC_SPLITS = 10


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class _Fidelity:
    """torch-fidelity keyword arguments for one extractor on one device, and the calls that use them.

    torch-fidelity never caches here (its cache unpickles .pt files): reference features and statistics go
    through uvic.feature_cache, under cache_root (None: $UVIC_CACHE_DIR/fidelity_cache; False: off)."""

    def __init__(self, extractor: Extractor, layers: Sequence[str], *, batch_size: int, device, cache_root,
                 verbose: bool, **metric_kwargs):
        create_feature_extractor = fidelity("utils", "create_feature_extractor")
        self.device = _device(device)
        self.extractor = extractor
        self.kwargs = dict(
            batch_size=batch_size,
            cuda=self.device.type == "cuda",
            verbose=verbose,
            feature_extractor=extractor.name,
            feature_extractor_weights_path=extractor.weights_path,
            cache=False,
            **metric_kwargs,
        )
        if cache_root is None:
            cache_root = digits_classifier.cache_dir() / "fidelity_cache"
        self.cache = FeatureCache(None if cache_root is False else cache_root)
        with self._on_device():
            try:
                self.fe = create_feature_extractor(extractor.name, list(layers), **self.kwargs)
            except RuntimeError as err:  # load_state_dict: missing keys, wrong shapes
                raise ValueError(f"{extractor.weights_path} does not hold {extractor.name} weights: {err}") from None

    def _on_device(self):
        """torch-fidelity moves to the current CUDA device: make it ours (cuda:1 ...)."""
        if self.device.type == "cuda" and self.device.index is not None:
            return torch.cuda.device(self.device.index)
        return contextlib.nullcontext()

    def _entry(self, inp: MetricInput) -> Optional[str]:
        # cache entries name the extractor and its weights too: features of other weights never mix
        return None if inp.cache_name is None else f"{inp.cache_name}-w{self.extractor.tag}-{self.extractor.name}"

    def features(self, inp: MetricInput) -> Dict[str, torch.Tensor]:
        """{layer: (N, D) features} of the input's images (reference inputs: cached)."""
        entry, layers = self._entry(inp), list(self.fe.get_requested_features_list())
        found = self.cache.features(entry, layers, len(inp.images)) if entry else None
        if found is not None:
            return found
        extract = fidelity("utils", "get_featuresdict_from_dataset")
        with self._on_device():
            out = extract(inp.images, self.fe, self.kwargs["batch_size"], self.kwargs["cuda"],
                          not inp.parallel_decode, self.kwargs["verbose"])
        if entry:
            self.cache.save_features(entry, out)
        return out

    def statistics(self, inp: MetricInput, features: Optional[dict] = None) -> FIDStatistics:
        """FID statistics of images: from `features` if given, else from the cache or the images' features."""
        layer, entry = self.extractor.layer("fid"), self._entry(inp)
        tags = dict(extractor=self.extractor.name, layer=layer, weights=self.extractor.tag)
        found = self.cache.statistics(entry, layer, tags, len(inp.images)) if entry else None
        if found is not None:
            return found
        features = self.features(inp) if features is None else features
        stats = FIDStatistics.from_features(features[layer].numpy(), **tags)
        if entry:
            self.cache.save_statistics(entry, layer, stats)
        return stats


def _check_counts(samples: MetricInput, ref: MetricInput, *, fid, kid, isc, prc, kid_subset_size) -> None:
    """Enough images on each side for each metric, before any feature is computed."""
    n = samples.num_images
    need_images = {"IS": isc, "KID": kid, "precision/recall": prc}
    for metric, wanted in need_images.items():
        if wanted and n is None:
            raise ValueError(f"{metric} needs sample images; {samples.source} holds only statistics")
        if wanted and metric != "IS" and ref.num_images is None:
            raise ValueError(f"{metric} needs reference images; {ref.source} holds only mu/sigma statistics")
    if fid:
        for side in (samples, ref):
            if side.stats is None and side.num_images is not None and side.num_images < 2:
                raise ValueError(f"FID needs at least 2 images; {side.source} has {side.num_images}")
    if kid:
        for side in (samples, ref):
            if side.num_images < kid_subset_size:
                raise ValueError(
                    f"KID draws subsets of {kid_subset_size} images, but {side.source} has {side.num_images}; "
                    f"use more samples or a smaller --kid-subset-size (at most {min(n, ref.num_images)})"
                )
    if prc:
        for side in (samples, ref):
            if side.num_images <= PRC_NEIGHBORHOOD:
                raise ValueError(
                    f"precision/recall needs more than {PRC_NEIGHBORHOOD} images; {side.source} has {side.num_images}"
                )
    if isc and n < ISC_SPLITS:
        raise ValueError(f"IS averages {ISC_SPLITS} splits: it needs at least {ISC_SPLITS} samples, got {n}")


def compute_metrics(
    samples,
    ref,
    *,
    fid: bool = True,
    kid: bool = False,
    isc: bool = False,
    prc: bool = False,
    batch_size: int = 64,
    device=None,
    inception_weights=None,
    data_root=None,
    feature_extractor: Optional[str] = None,
    kid_subset_size: int = KID_SUBSET_SIZE,
    download: bool = True,
    cache_root=None,
    verbose: bool = False,
    allow_resize: bool = False,
    bootstrap: int = 0,
    bootstrap_seed: int = 0,
) -> dict:
    """FID (and IS, KID, precision/recall) of `samples` against `ref` (see the module docstring for the
    accepted forms). The extractor is `feature_extractor` ("inception", "digits", a torch-fidelity name),
    else chosen from the inputs (choose_extractor). cache_root: torch-fidelity's feature / statistics cache
    of the reference (default $UVIC_CACHE_DIR/fidelity_cache; False: off). Samples and reference of different
    sizes are refused unless allow_resize (see check_resolution). bootstrap > 0: also a basic bootstrap
    interval of the FID over the samples and the reference images ("fid_low", "fid_high"; that many resamples,
    seeded by bootstrap_seed; "bootstrap_ref" False when the reference is a statistics file, samples only).

    Returns {"fid", "isc_mean", "isc_std", "kid_mean", "kid_std", "kid", "kid_se", "precision", "recall",
    "f_score"} (the metrics asked for) plus "extractor", "num_samples", "num_ref". kid_mean ± kid_std:
    torch-fidelity's mean and spread over subsets; kid ± kid_se: all samples against all reference images
    (each capped at 5,000) with a jackknife standard error (uvic.fid.kid_with_se).
    """
    if not (fid or kid or isc or prc):
        raise ValueError("no metric asked for: set at least one of fid, kid, isc, prc")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    samples_in = load_input(samples, data_root=data_root, download=download)
    ref_in = load_input(ref, data_root=data_root, download=download, cache=True)
    _check_counts(samples_in, ref_in, fid=fid, kid=kid, isc=isc, prc=prc, kid_subset_size=kid_subset_size)
    extractor_name = choose_extractor(feature_extractor, samples_in, ref_in)
    check_resolution(samples_in, ref_in, extractor_name, allow_resize)
    bootstrap = bootstrap if fid and samples_in.images is not None else 0  # resamples images, not statistics
    extractor = make_extractor(extractor_name, inception_weights_path=inception_weights, download=download)
    if fid:  # statistics files against these features, before any image is seen
        if samples_in.images is None:
            extractor.check(samples_in.stats, samples_in.source)
        if ref_in.stats is not None:
            extractor.check(ref_in.stats, ref_in.source)

    layers = {extractor.layer(m) for m, on in (("fid", fid), ("kid", kid), ("isc", isc), ("prc", prc)) if on}
    tf = _Fidelity(extractor, sorted(layers), batch_size=batch_size, device=device, cache_root=cache_root,
                   verbose=verbose, kid_subset_size=kid_subset_size, prc_neighborhood=PRC_NEIGHBORHOOD,
                   isc_splits=ISC_SPLITS)
    need_features = kid or isc or prc or bootstrap
    feats_s = tf.features(samples_in) if samples_in.images is not None and need_features else None
    # the bootstrap resamples the reference too when its images are at hand (a statistics file: samples only)
    feats_r = tf.features(ref_in) if (kid or prc or (bootstrap and ref_in.images is not None)) else None

    out: dict = {}
    if fid:
        stats_s = samples_in.stats if samples_in.images is None else tf.statistics(samples_in, feats_s)
        stats_r = ref_in.stats if ref_in.stats is not None else tf.statistics(ref_in, feats_r)
        out["fid"] = frechet_distance(stats_s.mu, stats_s.sigma, stats_r.mu, stats_r.sigma)
        if bootstrap:
            layer = extractor.layer("fid")
            iv = bootstrap_fid(feats_s[layer].numpy(), stats_r, resamples=bootstrap, seed=bootstrap_seed,
                               ref_features=None if feats_r is None else feats_r[layer].numpy())
            out.update(fid_low=iv.low, fid_high=iv.high, bootstrap_ref=feats_r is not None)
    if isc:
        r = fidelity("metric_isc", "isc_featuresdict_to_metric")(feats_s, extractor.layer("isc"), **tf.kwargs)
        out.update(isc_mean=r[KEY_METRIC_ISC_MEAN], isc_std=r[KEY_METRIC_ISC_STD])
    if kid:
        r = fidelity("metric_kid", "kid_featuresdict_to_metric")(feats_s, feats_r, extractor.layer("kid"), **tf.kwargs)
        out.update(kid_mean=r[KEY_METRIC_KID_MEAN], kid_std=r[KEY_METRIC_KID_STD])
        layer = extractor.layer("kid")
        out["kid"], out["kid_se"] = kid_with_se(feats_s[layer].numpy(), feats_r[layer].numpy())
    if prc:
        # save_cpu_ram: distances in blocks, never the full (N, N) matrices (10 GB for 50K vs 50K)
        out.update(fidelity("metric_prc", "prc_featuresdict_to_metric")(feats_s, feats_r, extractor.layer("prc"),
                                              **{**tf.kwargs, "save_cpu_ram": True}))
    out.update(extractor=extractor.name, num_samples=samples_in.count, num_ref=ref_in.count)
    return out


def compute_statistics(
    source,
    *,
    feature_extractor: Optional[str] = None,
    batch_size: int = 64,
    device=None,
    inception_weights=None,
    data_root=None,
    download: bool = True,
    cache_root=None,
    verbose: bool = False,
) -> FIDStatistics:
    """Tagged FID statistics of any image input (for --save-stats); statistics files pass through."""
    inp = load_input(source, data_root=data_root, download=download, cache=True)
    extractor = make_extractor(choose_extractor(feature_extractor, inp), inception_weights_path=inception_weights,
                               download=download)
    if inp.images is None:
        extractor.check(inp.stats, inp.source)
        return inp.stats
    if inp.num_images < 2:
        raise ValueError(f"statistics need at least 2 images; {inp.source} has {inp.num_images}")
    tf = _Fidelity(extractor, [extractor.layer("fid")], batch_size=batch_size, device=device,
                   cache_root=cache_root, verbose=verbose)
    return tf.statistics(inp)


def pipeline_fid(
    pipeline,
    *,
    num_samples: int,
    ref,
    steps: int = 50,
    scheduler=None,
    guidance: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
    device=None,
) -> float:
    """FID of `num_samples` samples of a UViCPipeline against `ref` (used for FID during training).

    Samples are drawn by uvic.sampling.generate_samples into a temporary folder (class labels, per-sample
    seeds and the sampler exactly as for a sample set); the reference's features are cached.
    """
    ref_in = load_input(ref)  # a bad reference, or one of another size, fails before any sampling
    size = MetricInput("the pipeline's samples", image_size=tuple(pipeline.image_shape[1:]))
    check_resolution(size, ref_in, choose_extractor(None, ref_in), allow_resize=False)
    with tempfile.TemporaryDirectory(prefix="uvic-fid-") as tmp:
        npz = generate_samples(pipeline, tmp, num_samples=num_samples, batch_size=batch_size, seed=seed,
                               scheduler=scheduler, steps=steps, guidance=guidance, progress=False)
        return compute_metrics(str(npz), ref, fid=True, batch_size=batch_size, device=device)["fid"]
