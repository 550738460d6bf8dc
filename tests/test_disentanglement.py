"""Known answers for the Morpho-MNIST morphometrics, their cache, MIG/SAP/DCI against them and the traversal atlas."""
import argparse
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy.stats import entropy, ortho_group, spearmanr
from sklearn.linear_model import LinearRegression
import skimage
from skimage import morphology, transform

import data
import measures
from model import BetaVAE, VAEConfig

# Castro et al. 2019's released morphometrics of MNIST training image 0 (train-morpho.csv, row 0)
CASTRO_TRAIN_0 = dict(area=107.31, length=50.27, thickness=2.461, slant=0.231, width=14.54, height=19.85)


# ----------------------------------------------------------------------------- morphometrics of synthetic shapes

def rendered(inside, supersample=8):
    """inside(x, y) -> bool on a fine grid -> (28, 28) float [0, 1] pixel coverage (x = column, y = row)."""
    c = (np.arange(28 * supersample) + 0.5) / supersample
    y, x = np.meshgrid(c, c, indexing="ij")
    return inside(x, y).astype(np.float64).reshape(28, supersample, 28, supersample).mean(axis=(1, 3))


def capsule(length, thickness, angle, dx=0):
    """-> (28, 28) [0, 1] stroke through (14 + dx, 14), `angle` from vertical, `length` between its caps' centres."""
    ux, uy = math.sin(angle), math.cos(angle)

    def inside(x, y):
        s = np.clip((x - 14 - dx) * ux + (y - 14) * uy, -length / 2, length / 2)
        return np.hypot(x - 14 - dx - s * ux, y - 14 - s * uy) <= thickness / 2
    return rendered(inside)


def sheared_bar(k, t=3.0, h=18.0):
    """-> (28, 28) [0, 1] parallelogram: a bar t wide and h tall through (14, 14), its column moving by -k per row."""
    return rendered(lambda x, y: (np.abs(x - (14 - k * (y - 14))) <= t / 2) & (np.abs(y - 14) <= h / 2))


def measured(image):
    """-> dict of the six morphometrics of one image."""
    return dict(zip(measures.FACTORS, measures.image_morphometrics(image)))


@pytest.mark.parametrize("w, h", [(10, 16), (6, 20), (14, 8)])
def test_a_filled_rectangle_has_its_area_and_its_mass_trimmed_width_and_height(w, h):
    image = np.zeros((28, 28))
    image[6:6 + h, 8:8 + w] = 1.0
    m = measured(image)
    # the half-level contour follows the edges; the upscale's smoothing only rounds the four corners (1/16 px each)
    assert abs(m["area"] - w * h) <= 0.5
    assert m["slant"] == pytest.approx(0.0, abs=1e-9)
    # trimming 1% of the mass from each side leaves 0.98 of a uniform box; the upscale (cubic spline + Gaussian of
    # sigma 1/3 px) spreads each edge over about a pixel, which moves the 1% points outwards, by under 0.5 px each
    for got, side in ((m["width"], w), (m["height"], h)):
        assert 0.98 * side < got < 0.98 * side + 1.0


def test_a_straight_stroke_has_its_length_and_thickness():
    for angle in (0.0, math.pi / 2):
        m = measured(capsule(16, 3, angle))
        assert m["thickness"] == pytest.approx(3.0, rel=0.02)
        # the discrete medial axis runs on into the round caps (up to t/2 at each end)
        assert 16 <= m["length"] <= 16 + 3
    # at 45 degrees every skeleton step is diagonal: sqrt(2) per step must give the same length
    diagonal = measured(capsule(16, 3, math.pi / 4))
    assert 16 - 0.5 <= diagonal["length"] <= 16 + 3
    assert measured(capsule(16, 3, 0.0))["area"] == pytest.approx(16 * 3 + math.pi * 1.5 ** 2, rel=0.03)


@pytest.mark.parametrize("k", [0.3, -0.4, 0.6])
def test_a_sheared_bar_has_its_slant_and_the_narrow_width(k):
    t, h = 3.0, 18.0
    m = measured(sheared_bar(k, t, h))
    # for the parallelogram u11 / u02 = -k exactly; pixel coverage (variance 1/12) and the upscale's Gaussian
    # (sigma 1/3 px) add variance to y but not covariance, which shrinks the measured shear by var / (var + 0.19)
    var_y = h ** 2 / 12
    assert m["slant"] == pytest.approx(math.atan(k * var_y / (var_y + 1 / 12 + 1 / 9)), abs=0.002)
    assert m["slant"] == pytest.approx(math.atan(k), rel=0.01)
    assert 0.98 * t < m["width"] < 0.98 * t + 2.0  # the bar's own width, not its bounding box's (t + |k| h)
    assert 0.98 * h < m["height"] < 0.98 * h + 1.0


def test_uint8_and_unit_float_images_measure_the_same_and_a_blank_image_gives_nans():
    image = (capsule(14, 2.5, 0.4) * 255).round().astype(np.uint8)
    assert np.array_equal(measures.image_morphometrics(image), measures.image_morphometrics(image / 255.0))
    blank = measures.image_morphometrics(np.zeros((28, 28), np.uint8))
    assert blank[:2].tolist() == [0.0, 0.0] and np.isnan(blank[2:]).all()


def test_the_cached_medial_axis_tables_give_skimages_medial_axis_exactly():
    rng = np.random.default_rng(0)
    for _ in range(20):
        blobs = transform.resize(rng.random((7, 7)), (60, 60), order=3) > 0.55
        ours, distance = measures.medial_axis(blobs)
        theirs, their_distance = morphology.medial_axis(blobs, return_distance=True, rng=0)
        assert np.array_equal(ours, theirs) and np.array_equal(distance, their_distance)


def test_the_process_pool_gives_the_in_process_values(monkeypatch):
    # a pool for one image: one chunk, so one spawned worker, which alone takes seconds to import torch
    monkeypatch.setattr(measures, "IN_PROCESS_BELOW", 0)
    images = capsule(14, 2.5, 0.4)[None]
    pooled = measures.morphometrics(images, workers=2)
    assert pooled.shape == (1, 6) and np.array_equal(pooled[0], measures.image_morphometrics(images[0]))


def test_a_daemon_process_measures_in_process(monkeypatch):
    # A Dask nanny's workers are daemons, which may not start processes: a pool there raised AssertionError
    monkeypatch.setattr(measures, "IN_PROCESS_BELOW", 0)
    monkeypatch.setattr(measures.multiprocessing, "current_process", lambda: argparse.Namespace(daemon=True))
    monkeypatch.setattr(measures.cf, "ProcessPoolExecutor", None)  # a pool would now fail: None is not callable
    images = capsule(14, 2.5, 0.4)[None]
    assert np.array_equal(measures.morphometrics(images, workers=2)[0], measures.image_morphometrics(images[0]))


# ----------------------------------------------------------------------------- real MNIST against Castro et al.

def test_mnist_training_image_0_matches_castros_released_values(mnist_dir):
    m = measured(data.read_idx(data.raw_dir(mnist_dir, "mnist") / "train-images-idx3-ubyte")[0])
    for name in ("area", "slant", "width", "height"):
        assert m[name] == pytest.approx(CASTRO_TRAIN_0[name], rel=0.01), name
    # the skeleton, on which length and thickness rest, changes with skimage's version: their values came from an
    # older one (its upscale and medial axis differ in detail), and no version at hand reproduces them exactly
    for name in ("length", "thickness"):
        assert m[name] == pytest.approx(CASTRO_TRAIN_0[name], rel=0.06), name


def naive_morphometrics(image):
    """(28, 28) uint8 -> (6,) the same definitions, by explicit loops over pixels (skimage's upscale, medial axis)."""
    grey = (255.0 * transform.pyramid_expand(image / 255.0, 4, order=3, channel_axis=None)).astype(np.uint8)  # truncated
    binary = grey >= grey.min() + 0.5 * (grey.max() - grey.min())
    skeleton, distance = morphology.medial_axis(binary, return_distance=True, rng=0)
    length = 0.0
    for y, x in zip(*np.nonzero(skeleton)):  # every neighbour pair seen from both ends, so halved below
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                yy, xx = y + dy, x + dx
                if (dy or dx) and 0 <= yy < 112 and 0 <= xx < 112 and skeleton[yy, xx]:
                    length += math.sqrt(2) if dy and dx else 1.0
    y, x = np.nonzero(grey)  # the moments by their definitions, as sums over the grey pixels
    v = grey[y, x]
    xc, yc = np.sum(x * v) / np.sum(v), np.sum(y * v) / np.sum(v)
    u11, u02 = np.sum((x - xc) * (y - yc) * v), np.sum((y - yc) ** 2 * v)
    width = naive_extent(zip((x - u11 / u02 * (y - yc)).tolist(), v.tolist()))
    height = naive_extent(zip(y.tolist(), v.tolist()))
    thickness = 2 * sum(distance[skeleton]) / skeleton.sum()
    return np.array([binary.sum() / 16, length / 2 / 4, thickness / 4, math.atan(-u11 / u02), width / 4, height / 4])


def naive_extent(points):
    """[(position, mass)] -> distance between the 1% and 99% mass points, mass spread evenly over unit bins."""
    bins = {}
    for pos, v in points:
        b = math.floor(pos + 0.5)  # the unit bin [b - 0.5, b + 0.5)
        bins[b] = bins.get(b, 0.0) + v
    total = sum(bins.values())
    ends = []
    for target in (0.01 * total, 0.99 * total):
        cum = 0.0
        for b in sorted(bins):
            if cum + bins[b] >= target:
                ends.append(b - 0.5 + (target - cum) / bins[b])
                break
            cum += bins[b]
    return ends[1] - ends[0]


def test_100_test_images_agree_with_a_naive_implementation(mnist_dir):
    images = data.read_idx(data.raw_dir(mnist_dir, "mnist") / "t10k-images-idx3-ubyte")[:100]
    fast = measures.morphometrics(images, workers=1)
    naive = np.array([naive_morphometrics(image) for image in images])
    rel = np.abs(fast - naive) / np.maximum(np.abs(naive), 1e-3)
    assert np.all(np.median(rel, axis=0) < 1e-6)  # the same definitions: equal but for rounding
    assert np.all((rel < 1e-3).mean(axis=0) >= 0.99)  # a pixel exactly on a bin edge may fall either way


# ----------------------------------------------------------------------------- the cache

@pytest.fixture
def idx_and_images(tmp_path):
    """-> an 'IDX file' and the 5 images it stands for."""
    image_file = tmp_path / "images-idx3-ubyte"
    image_file.write_bytes(b"some images")
    return image_file, np.array([capsule(10 + i, 2 + i / 4, i / 5) for i in range(5)])


def counting(monkeypatch):
    """Wrap measures.morphometrics -> list that gets one entry per call."""
    calls, real = [], measures.morphometrics
    monkeypatch.setattr(measures, "morphometrics", lambda images, workers=None: calls.append(1) or real(images, 1))
    return calls


def test_the_cache_measures_once_and_is_read_back_exactly(tmp_path, idx_and_images, monkeypatch):
    image_file, images = idx_and_images
    calls, cache = counting(monkeypatch), tmp_path / "morpho-test.csv"
    first = measures.cached_morphometrics(images, image_file, cache)
    second = measures.cached_morphometrics(images, image_file, cache)
    assert len(calls) == 1 and np.array_equal(first, second)
    assert np.array_equal(first, [measures.image_morphometrics(image) for image in images])
    lines = cache.read_text().splitlines()
    assert lines[0] == (f"# morphometrics v{measures.MORPHO_VERSION} skimage={skimage.__version__} "
                        f"md5={data.file_digest(image_file)} n=5")
    assert lines[1] == "index,area,length,thickness,slant,width,height" and len(lines) == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images-idx3-ubyte", "morpho-test.csv"]  # no temp file


def test_a_cache_for_more_images_serves_fewer_and_a_request_for_more_measures_again(tmp_path, idx_and_images,
                                                                                    monkeypatch):
    image_file, images = idx_and_images
    calls, cache = counting(monkeypatch), tmp_path / "morpho-test.csv"
    five = measures.cached_morphometrics(images, image_file, cache)
    assert np.array_equal(measures.cached_morphometrics(images[:3], image_file, cache), five[:3]) and len(calls) == 1
    assert np.array_equal(measures.read_morphometrics_cache(cache, data.file_digest(image_file), 3), five[:3])
    assert cache.read_text().splitlines()[0].endswith(" n=5")  # the smaller request leaves the larger cache alone
    six = np.concatenate([images, images[:1]])
    assert np.array_equal(measures.cached_morphometrics(six, image_file, cache)[:5], five) and len(calls) == 2
    assert cache.read_text().splitlines()[0].endswith(" n=6")
    assert measures.read_morphometrics_cache(cache, "0" * 32, 3) is None  # another file's cache


@pytest.mark.parametrize("spoil", ["truncate", "stale", "foreign", "skimage", "columns", "indices", "nan", "garbage"])
def test_a_spoiled_cache_is_measured_again(tmp_path, idx_and_images, monkeypatch, spoil):
    image_file, images = idx_and_images
    cache = tmp_path / "morpho-test.csv"
    good = measures.cached_morphometrics(images, image_file, cache)
    lines = cache.read_text().splitlines()
    if spoil == "truncate":
        cache.write_text("\n".join(lines[:-1]) + "\n")
    elif spoil == "stale":
        image_file.write_bytes(b"other images")
    elif spoil == "foreign":
        images = np.concatenate([images, images[:1]])  # 6 images against a cache of 5
    elif spoil == "skimage":  # measured by another skimage, whose skeleton differs
        monkeypatch.setattr(skimage, "__version__", "0.1")
    elif spoil == "columns":
        cache.write_text("\n".join([lines[0], lines[1].replace("slant", "tilt")] + lines[2:]))
    elif spoil == "indices":
        cache.write_text("\n".join(lines[:2] + ["9" + lines[2][1:]] + lines[3:]))
    elif spoil == "nan":
        cache.write_text("\n".join(lines[:2] + [lines[2].rsplit(",", 1)[0] + ",nan"] + lines[3:]))
    else:
        cache.write_bytes(b"\xff\xfe not a csv")
    calls = counting(monkeypatch)
    again = measures.cached_morphometrics(images, image_file, cache)
    assert len(calls) == 1 and np.array_equal(again[:5], good)
    assert len(measures.cached_morphometrics(images, image_file, cache)) == len(images) and len(calls) == 1


def test_an_unwritable_cache_folder_just_returns_the_values(tmp_path, idx_and_images):
    image_file, images = idx_and_images
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    values = measures.cached_morphometrics(images, image_file, not_a_folder / "morpho-test.csv")
    assert np.array_equal(values, [measures.image_morphometrics(image) for image in images])


# ----------------------------------------------------------------------------- disentanglement metrics

def uniform_factors(n=5000, k=5, seed=0):
    """-> (n, k) independent uniform factors."""
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, k))


def test_copied_factors_score_high_their_rotation_lower_and_noise_near_zero():
    factors = uniform_factors()
    rng = np.random.default_rng(1)
    copied = factors + 0.01 * rng.normal(size=factors.shape)
    rotated = copied @ ortho_group.rvs(5, random_state=2)
    noise = rng.normal(size=factors.shape)
    scores = {}
    for name, codes in (("copied", copied), ("rotated", rotated), ("noise", noise)):
        gaps, _ = measures.mig(codes, factors)
        importance, r2 = measures.dci_importances(codes[:2000], factors[:2000], 1000)
        d, c = measures.dci_scores(importance)
        scores[name] = dict(mig=gaps.mean(), sap=measures.sap(codes, factors)[0].mean(), d=d, c=c, i=r2.mean())
    # MIG of a copy stays below 1: noise across bin edges, and the plug-in MI of independent 20-bin variables is
    # biased up by ~(20 - 1)^2 / 2N nats, which the second best dimension adds (0.85 here; 0.81 at N = 2000)
    assert scores["copied"]["mig"] > 0.8 and scores["copied"]["sap"] > 0.9 and scores["copied"]["d"] > 0.9
    assert scores["copied"]["c"] > 0.9 and scores["copied"]["i"] > 0.95
    assert scores["copied"]["mig"] - scores["rotated"]["mig"] > 0.3
    assert scores["copied"]["d"] - scores["rotated"]["d"] > 0.3
    assert all(scores["noise"][m] < 0.1 for m in ("mig", "sap", "d", "i"))


def test_mig_is_exactly_invariant_to_an_increasing_affine_code_and_a_monotone_factor_transform():
    rng = np.random.default_rng(3)
    factors = uniform_factors(1000, 3, seed=4)
    codes = np.round((factors @ rng.normal(size=(3, 4))) * 1024) / 1024  # dyadic: the affine maps below are exact
    gaps, mi = measures.mig(codes, factors)
    affine = codes * np.array([2.0, 0.5, 4.0, 1.0]) + np.array([0.25, -3.0, 0.0, 7.5])
    assert np.array_equal(measures.mig(affine, factors)[1], mi)
    monotone = np.column_stack([np.exp(factors[:, 0]), factors[:, 1] ** 3, np.arctan(5 * factors[:, 2])])
    assert np.array_equal(measures.mig(codes, monotone)[0], gaps)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2 ** 32 - 1), d=st.integers(1, 4), k=st.integers(1, 3), levels=st.integers(2, 50))
def test_mig_lies_in_0_1_and_ignores_monotone_factor_transforms(seed, d, k, levels):
    rng = np.random.default_rng(seed)
    factors = rng.integers(0, levels, size=(300, k)).astype(np.float64)  # ties: few-valued factors still bin
    codes = factors[:, rng.integers(0, k, size=d)] + rng.normal(scale=rng.uniform(0, 3), size=(300, d))
    gaps, mi = measures.mig(codes, factors)
    valid = ~np.isnan(gaps)  # a factor that drew a single value has no entropy, hence no gap
    assert np.all((gaps[valid] >= -1e-12) & (gaps[valid] <= 1 + 1e-12)) and np.all(mi >= -1e-12)
    assert np.array_equal(measures.mig(codes, np.exp(factors / levels) - 3)[0], gaps, equal_nan=True)


def test_degenerate_codes_do_not_crash():
    factors = uniform_factors(400, 3)
    codes = np.column_stack([factors[:, 0], np.full(400, 0.7), factors[:, 1]])
    gaps, mi = measures.mig(codes, factors)
    assert np.all(mi[1] == 0) and np.isfinite(gaps).all()
    assert np.all(measures.sap(codes, factors)[1][1] == 0)
    one_gaps, one_mi = measures.mig(codes[:, :1], factors)  # d = 1: the second best is 0
    h = [entropy(np.bincount(measures.equal_frequency_bins(f))) for f in factors.T]
    assert one_mi.shape == (1, 3) and np.allclose(one_gaps, one_mi[0] / h) and one_gaps[0] > 0.8
    one_sap, one_r2 = measures.sap(codes[:, :1], factors)
    assert np.array_equal(one_sap, one_r2[0])
    importance, r2 = measures.dci_importances(codes, factors, 200)  # a dead (constant) dimension: importance 0
    assert np.all(importance[1] == 0) and np.isfinite(r2).all() and np.isfinite(measures.dci_scores(importance)).all()
    with pytest.raises(ValueError, match="DCI needs"):
        measures.dci_importances(codes[:11], factors[:11], 10)


def test_mig_divides_by_the_factors_entropy_not_by_log_bins():
    factor = (np.arange(400) % 10 < 3).astype(np.float64)  # two values, 30% ones: H = 0.611 nats, log 20 = 3.00
    gaps, mi = measures.mig(factor[:, None], factor[:, None])  # the code copies it: I(z; v) = H(v), gap over 0
    assert np.isclose(mi[0, 0], entropy([0.7, 0.3])) and np.isclose(gaps[0], 1.0)


def test_a_constant_factor_nulls_the_disentanglement_block_with_its_reason():
    factors = uniform_factors(400, len(measures.FACTORS))
    factors[:, measures.FACTORS.index("slant")] = 0.25
    with pytest.raises(ValueError, match="factor slant is constant"):
        measures.disentanglement(factors[:, :3], factors, 200)
    unavailable = {}
    assert measures.measure_or_null(unavailable, "disentanglement", measures.disentanglement, factors[:, :3],
                                    factors, 200) is None and "slant is constant" in unavailable["disentanglement"]


def test_sap_scores_the_r2_of_each_one_code_linear_regression_and_its_top_two_gap():
    factors = uniform_factors(500, 3, seed=12)
    codes = factors @ np.random.default_rng(13).normal(size=(3, 4)) + np.random.default_rng(14).normal(size=(500, 4))
    gaps, r2 = measures.sap(codes, factors)
    # Kumar et al. 2018: R^2 of a linear regression of each factor on each code dimension alone
    fits = np.array([[LinearRegression().fit(c[:, None], f).score(c[:, None], f) for f in factors.T] for c in codes.T])
    assert r2 == pytest.approx(fits, abs=1e-12) and fits.min() < 0.2 < fits.max()
    assert gaps == pytest.approx(np.sort(fits, axis=0)[-1] - np.sort(fits, axis=0)[-2], abs=1e-12)


def disentanglement_lib_dci(r):
    """disentanglement_lib's dci.py formulas, written out: (d, k) importances -> D, C."""
    per_code = 1.0 - entropy(r.T + 1e-11, base=r.shape[1])
    per_factor = 1.0 - entropy(r + 1e-11, base=r.shape[0])
    return np.sum(per_code * r.sum(1) / r.sum()), np.sum(per_factor * r.sum(0) / r.sum())


def test_dci_scores_follow_disentanglement_lib():
    assert measures.dci_scores(np.eye(4)) == pytest.approx((1.0, 1.0), abs=1e-8)
    assert measures.dci_scores(np.ones((4, 3))) == pytest.approx((0.0, 0.0), abs=1e-8)
    r = np.random.default_rng(5).random((6, 4))
    r[2] = 0  # a dead dimension
    assert measures.dci_scores(r) == pytest.approx(disentanglement_lib_dci(r))
    assert measures.dci_scores(np.zeros((3, 2))) == pytest.approx((0.0, 0.0), abs=1e-8)


def test_dci_scores_held_out_rows_drawn_at_random_not_the_last_ones():
    # rows sorted by the factor, as MNIST's test set is by writer population: the last rows lie outside the first
    # ones' range, where trees predict a constant (R^2 < 0); rows drawn at random interpolate (R^2 ~ 1)
    factors = np.sort(uniform_factors(600, 1, seed=15), axis=0)
    codes = factors + 0.01 * np.random.default_rng(16).normal(size=factors.shape)
    assert measures.dci_importances(codes, factors, 300)[1][0] < 0
    block = measures.disentanglement(np.tile(codes, 6), np.tile(factors, 6), 300, seed=3)
    assert all(block["per_factor"][n]["r2"] > 0.95 for n in measures.FACTORS)
    assert block == measures.disentanglement(np.tile(codes, 6), np.tile(factors, 6), 300, seed=3)  # seeded
    assert block["per_factor"]["slant"]["r2"] != measures.disentanglement(
        np.tile(codes, 6), np.tile(factors, 6), 300, seed=4)["per_factor"]["slant"]["r2"]
    assert block["protocol"]["dci_split"] == "rows by numpy default_rng(3).permutation"


def test_the_disentanglement_block_averages_all_factors_but_area():
    factors = uniform_factors(1200, 6, seed=6)
    codes = factors[:, [1, 2, 3, 4, 5, 0]] + 0.01 * np.random.default_rng(7).normal(size=(1200, 6))
    block = measures.disentanglement(codes, factors, 600)
    json.dumps(block)
    assert block["protocol"]["averaged"] == list(measures.AVERAGED) == [n for n in measures.FACTORS if n != "area"]
    assert block["protocol"]["n_train"] == 600 and block["protocol"]["n_test"] == 600
    assert [block["per_factor"][n]["top_dim"] for n in measures.FACTORS] == [5, 0, 1, 2, 3, 4]
    assert block["mig"] == pytest.approx(np.mean([block["per_factor"][n]["mig"] for n in measures.AVERAGED]))
    assert block["sap"] == pytest.approx(np.mean([block["per_factor"][n]["sap"] for n in measures.AVERAGED]))
    assert block["dci_i"] == pytest.approx(np.mean([block["per_factor"][n]["r2"] for n in measures.AVERAGED]))
    assert np.array(block["mi"]).shape == (6, 6) and block["dci_d"] > 0.9 and block["sap"] > 0.9
    with pytest.raises(ValueError, match="DCI needs"):  # one test row: no R^2
        measures.disentanglement(codes[:20], factors[:20], 19)


# ----------------------------------------------------------------------------- traversal atlas

def test_traversal_effects_follow_scipys_spearman_and_count_constant_and_blank_series_as_0():
    values = np.linspace(-3, 3, 9)
    series = np.round(np.random.default_rng(8).normal(size=(2, 6, 9)), 1)  # 2 base digits, 6 factors, 9 steps
    series[:, 0] = 2.0  # constant: no rank correlation
    series[:, 1] = 10 * values  # rises with the value, but a blank decoded image (NaN) in each base spoils it
    series[:, 1, 4] = np.nan
    rho = np.array([[0.0, 0.0] + [spearmanr(values, s)[0] for s in base[2:]] for base in series]).mean(axis=0)
    change = np.nan_to_num((series[:, :, -1] - series[:, :, 0]).mean(axis=0) / 2)
    # |change| x |rho|: 0.051 thickness, 0.013 slant, 0.004 width, 0.072 height; length's spoiled series counts 0
    # for all its change of 30 (10 per step over 6, in units of 2)
    j = measures.FACTORS.index("height")
    [effect] = measures.traversal_effects([5], values, series.transpose(0, 2, 1)[None], np.full(6, 2.0))
    assert change[1] == 30 and effect == {"dim": 5, "factor": "height", "rho": pytest.approx(rho[j]),
                                          "effect_sd": pytest.approx(change[j])}


def test_a_series_constant_but_for_rounding_counts_as_0():
    slid = np.array([capsule(14, 2.5, 0.3, dx=step) for step in range(-4, 5)])  # the same stroke, moved 1 px a step
    factors = measures.morphometrics(slid, workers=1)
    assert np.allclose(factors, factors[0], rtol=1e-12, atol=0)  # the premise: translation changes nothing
    [effect] = measures.traversal_effects([0], np.linspace(-3, 3, 9), factors[None, None], np.ones(6))
    assert effect["rho"] == 0.0 and effect["effect_sd"] == pytest.approx(0.0, abs=1e-12)


def test_traversal_effects_name_the_factor_each_dimension_moves():
    values = np.linspace(-3, 3, 9)
    rng = np.random.default_rng(9)
    factors = np.broadcast_to(rng.normal(size=(1, 4, 1, 6)), (4, 4, 9, 6)).copy()  # 4 dims, 4 bases, 6 factors
    factors[0, :, :, 3] += 0.1 * values  # the first dim raises slant by 0.6 over the traversal
    factors[1, :, :, 2] -= 0.5 * values ** 3  # the second thins the strokes by 27 over it, monotone but not linear
    # the fourth: width +1.2 sd and slant +0.3 sd, both monotone (rho 1 each); length +6 sd for one digit only (mean
    # change 1.5 sd, mean rho 0.25); area +30 sd, which moves with the others and names none
    factors[3, :, :, 4] += 0.2 * values
    factors[3, :, :, 3] += 0.01 * values
    factors[3, 0, :, 1] += values
    factors[3, :, :, 0] += 5 * values
    test_std = np.array([1, 1, 10.0, 0.2, 1, 1])
    effects = measures.traversal_effects([4, 0, 7, 2], values, factors, test_std)
    assert effects[0] == {"dim": 4, "factor": "slant", "rho": 1.0, "effect_sd": pytest.approx(3.0)}
    assert effects[1] == {"dim": 0, "factor": "thickness", "rho": -1.0, "effect_sd": pytest.approx(-2.7)}
    assert effects[2]["dim"] == 7 and effects[2]["rho"] == 0.0 and effects[2]["effect_sd"] == 0.0  # moves nothing
    assert effects[2]["factor"] is None and measures.atlas_label(effects[2]) == "z7: no factor moves"
    assert effects[3] == {"dim": 2, "factor": "width", "rho": 1.0, "effect_sd": pytest.approx(1.2)}
    only_area = np.broadcast_to(factors[2:3], (1, 4, 9, 6)).copy()  # nothing moves ...
    only_area[0, :, :, 0] += 0.5 * values  # ... but the stroke's area, +3 sd
    assert measures.traversal_effects([1], values, only_area, test_std) == [
        {"dim": 1, "factor": "area", "rho": 1.0, "effect_sd": pytest.approx(3.0)}]
    assert measures.atlas_label(effects[0]) == "z4: slant +3.0 sd"
    assert measures.atlas_label(effects[1]) == "z0: thickness -2.7 sd"


def test_the_factor_report_scores_the_first_test_images_and_reads_drawn_traversals(mnist_dir, monkeypatch):
    n = 300
    images = data.read_idx(data.raw_dir(mnist_dir, "mnist") / "t10k-images-idx3-ubyte")[:n]
    torch.manual_seed(0)
    model = BetaVAE(VAEConfig(hidden=(32, 16), latent_dim=3))
    with torch.no_grad():
        mu = model.encode(torch.as_tensor(images.reshape(n, 784) / 255.0, dtype=torch.float32))[0].numpy()
    values = np.linspace(-3, 3, 9)
    # drawn, not decoded: z2 shears a bar (slant rises with it, the other factors are about even in it); z0 is dead
    sheared = [sheared_bar(0.15 * v) for v in values]
    dead = [capsule(14, 2.5, 0.3)] * 9  # the decoder ignores z0
    traversals = torch.tensor(np.array([[sheared], [dead]]), dtype=torch.float32).reshape(2, 1, 9, 784)
    pools, pool = [], measures.cf.ThreadPoolExecutor  # --threads 1, as a grid member with as many workers as cores
    monkeypatch.setattr(measures.cf, "ThreadPoolExecutor", lambda n: pools.append(n) or pool(n))
    args = argparse.Namespace(data_dir=mnist_dir, dataset="mnist", threads=1, seed=7)
    report = measures.factor_report(mu, traversals, [2, 0], values.tolist(), args)
    assert pools == [1]
    json.dumps(report)
    factors = measures.test_set_morphometrics(mnist_dir, "mnist", n)  # from the cache the report itself filled
    assert factors.shape == (n, 6) and np.array_equal(factors[:20], measures.morphometrics(images[:20], workers=1))
    expected = measures.disentanglement(mu, factors, n // 2, seed=7)
    assert {k: v for k, v in report.items() if k != "atlas"} == expected
    slant = measures.FACTORS.index("slant")
    assert report["atlas"][0]["dim"] == 2 and report["atlas"][0]["factor"] == "slant"
    ends = [measured(traversals[0, 0, i].reshape(28, 28).numpy())["slant"] for i in (0, -1)]
    assert report["atlas"][0]["rho"] == 1.0 and ends[0] < -0.4 < 0.4 < ends[1]
    assert report["atlas"][0]["effect_sd"] == pytest.approx((ends[1] - ends[0]) / factors[:, slant].std())
    assert report["atlas"][1]["dim"] == 0 and report["atlas"][1]["rho"] == 0.0 and report["atlas"][1]["effect_sd"] == 0
    fashion = argparse.Namespace(data_dir=mnist_dir, dataset="fashion-mnist")
    with pytest.raises(ValueError, match="Morpho-MNIST"):
        measures.factor_report(mu, traversals, [2, 0], values.tolist(), fashion)
    with pytest.raises(ValueError, match="1-d code"):  # MIG's gap to a second dimension would be a gap to 0
        measures.factor_report(mu[:, :1], traversals[:1], [0], values.tolist(), args)
