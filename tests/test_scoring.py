import hashlib
import json
from dataclasses import fields, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from sanitizer.checkpoint import META, load_decoder, load_holdout
from sanitizer.data.shards import expand_shards
from sanitizer.decoder_meta import (
    AXIS_SCALE_KNOTS,
    ERRORS,
    AxisScale,
    DedeConfig,
    ScoreSettings,
    axis_scale_for,
)
from sanitizer.encoders import embed_pixels
from sanitizer.errors import UsageError
from sanitizer.model import DedeDecoder
from sanitizer.pipeline.stages import ScoreStage, read_shard, rebatch
from sanitizer.scoring import (
    SSIM_C1,
    SSIM_C2,
    Scorer,
    Scores,
    aggregate_errors,
    calibrate,
    key_seeds,
    mask_noise,
    patch_dissimilarity,
    patch_error,
    relax_token,
)
from sanitizer.thresholds import DEFAULT_RULE, parse_rule, resolve_threshold
from sanitizer.train import TrainSettings, split_holdout

from .conftest import TINY_SIZE


def test_key_seeds_are_blake2b_of_the_key():
    expected = int.from_bytes(hashlib.blake2b(b"shard-0/abc", digest_size=8).digest(), "little", signed=True)
    assert key_seeds(["shard-0/abc"]).tolist() == [expected]
    assert key_seeds(["x", "y", "x"]).tolist()[0] == key_seeds(["x"]).tolist()[0]


def test_mask_noise_is_a_pure_function_of_seed_and_mask_index():
    seeds = torch.from_numpy(key_seeds(["a", "b", "c", "d"]))
    noise = mask_noise(seeds, 64, 0)
    assert noise.shape == (4, 64)
    assert torch.equal(mask_noise(seeds[2:3], 64, 0), noise[2:3])  # independent of the batch
    assert not torch.equal(mask_noise(seeds, 64, 1), noise)  # each mask index differs
    assert len({tuple(torch.argsort(row)[:6].tolist()) for row in noise}) == 4
    assert int(noise.min()) >= 0 and int(noise.max()) < 2**32


def test_quantile_aggregates_ignore_a_few_outlier_patches_and_visible_ones():
    errors = torch.arange(1.0, 11.0).unsqueeze(0)  # hidden patches' errors 1..8, then two visible
    errors[0, :2] = 100.0  # two trigger patches, rebuilt badly
    mask = torch.ones(1, 10)
    mask[0, 8:] = 0
    hidden = [100.0, 100.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    assert aggregate_errors(errors, mask, "mean").item() == pytest.approx(np.mean(hidden))
    assert aggregate_errors(errors, mask, "median").item() == pytest.approx(np.quantile(hidden, 0.5))
    assert aggregate_errors(errors, mask, "q25").item() == pytest.approx(np.quantile(hidden, 0.25))
    assert aggregate_errors(errors, mask, "q25").item() == pytest.approx(4.75)


def test_train_cli_defaults_are_the_settings_defaults():
    from sanitizer.cli import build_parser

    args = build_parser().parse_args(["train", "--encoder", "timm:x", "--data", "d", "--out", "o"])
    given = ScoreSettings(**{f.name: getattr(args, f.name) for f in fields(ScoreSettings)})
    assert given == ScoreSettings()  # one flag per setting, with the setting's default
    assert args.holdout == TrainSettings().holdout and args.mask_ratio == TrainSettings().mask_ratio
    assert (args.trim, args.refit, args.lr, args.batch_size) == (
        TrainSettings().trim,
        TrainSettings().refit,
        TrainSettings().lr,
        TrainSettings().batch_size,
    )


def test_settings_are_validated():
    with pytest.raises(UsageError, match="test-mask-ratio"):
        ScoreSettings(test_mask_ratio=1.0)
    with pytest.raises(UsageError, match="aggregate"):
        ScoreSettings(aggregate="max")
    with pytest.raises(
        UsageError, match=r"--axis-aggregate must be one of \('mean', 'median', 'q25'\), not 'max'"
    ):
        ScoreSettings(axis_aggregate="max")
    with pytest.raises(UsageError, match="--error-pool must be at least 1, not 0"):
        ScoreSettings(error_pool=0)
    with pytest.raises(UsageError, match=r"--error must be one of \('mse', 'ssim'\), not 'l1'"):
        ScoreSettings(error="l1")
    with pytest.raises(UsageError, match=r"--axis-error must be one of \('mse', 'ssim'\), not 'l1'"):
        ScoreSettings(axis_error="l1")
    with pytest.raises(UsageError, match="--relax-steps must be at least 0, not -1"):
        ScoreSettings(relax_steps=-1)
    with pytest.raises(UsageError, match="--relax-radius must be above 0, not 0"):
        ScoreSettings(relax_radius=0)


def test_error_pool_must_divide_the_patch(tiny_decoder_dir, tiny_encoder):
    decoder, _ = load_decoder(tiny_decoder_dir)  # 8 px patches
    with pytest.raises(UsageError, match="--error-pool 3 does not divide the decoder's 8 px patches"):
        Scorer(tiny_encoder, decoder, ScoreSettings(error_pool=3))


def test_settings_saved_before_a_setting_existed_read_as_they_were_scored():
    old = {"test_mask_ratio": 0.99, "num_masks": 2, "aggregate": "q25"}
    unrelaxed = one_aggregate(num_masks=2, relax_steps=0)
    assert ScoreSettings.from_dict(old) == replace(unrelaxed, error_pool=1, error="mse", axis_error="mse")
    before_ssim = {**old, "error_pool": 2}
    assert ScoreSettings.from_dict(before_ssim) == replace(unrelaxed, error="mse", axis_error="mse")
    before_relax = {**before_ssim, "error": "ssim"}
    assert ScoreSettings.from_dict(before_relax) == unrelaxed
    before_axis = {**before_relax, "relax_steps": 3, "relax_radius": 0.03}  # one aggregate for every row
    assert ScoreSettings.from_dict(before_axis).axis_aggregate == "q25"
    assert ScoreSettings.from_dict({**before_axis, "aggregate": "median"}).axis_aggregate == "median"
    before_axis_error = {**before_axis, "axis_aggregate": "mean"}  # sessions 43-46: 1 - SSIM on axes too
    assert ScoreSettings.from_dict(before_axis_error) == replace(
        ScoreSettings(num_masks=2), axis_error="ssim"
    )
    for axis_error in ERRORS:
        settings = ScoreSettings(
            num_masks=3,
            error_pool=4,
            relax_steps=5,
            relax_radius=0.3,
            axis_aggregate="mean",
            axis_error=axis_error,
        )
        assert ScoreSettings.from_dict(settings.to_dict()) == settings


def one_aggregate(*args, **kwargs) -> ScoreSettings:
    """ScoreSettings measuring every row, axis or not, by their aggregate and error: a Scorer of them
    needs no AxisScale."""
    settings = ScoreSettings(*args, **kwargs)
    return settings.alone(settings.aggregate, settings.error)


@pytest.fixture(scope="module")
def scorer_parts(tiny_decoder_dir, tiny_encoder):
    decoder, meta = load_decoder(tiny_decoder_dir)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (23, 32, 32, 3), dtype=np.uint8)
    seeds = key_seeds([f"k{i}" for i in range(23)])
    return decoder, pixels, seeds


def test_scores_identical_across_batch_sizes_order_and_runs(scorer_parts, tiny_encoder):
    decoder, pixels, seeds = scorer_parts
    settings = one_aggregate(num_masks=3)
    ref = Scorer(tiny_encoder, decoder, settings, micro_batch=8).score(pixels, seeds)
    again = Scorer(tiny_encoder, decoder, settings, micro_batch=8).score(pixels, seeds)
    assert np.array_equal(ref.score, again.score)
    # Batches as the pipeline would cut them: 1, 7 and all at once.
    for cut in (1, 7, 23):
        parts = [
            Scorer(tiny_encoder, decoder, settings, micro_batch=8).score(
                pixels[i : i + cut], seeds[i : i + cut]
            )
            for i in range(0, 23, cut)
        ]
        assert np.array_equal(np.concatenate([p.score for p in parts]), ref.score)
    perm = np.random.default_rng(1).permutation(23)
    shuffled = Scorer(tiny_encoder, decoder, settings, micro_batch=8).score(pixels[perm], seeds[perm])
    assert np.array_equal(shuffled.score, ref.score[perm])
    assert ref.score.dtype == np.float32 and (ref.score > 0).all() and (ref.score_std >= 0).all()


def scored_at(decoder_dir, tables: list[pa.Table], settings: dict, micro_batch: int) -> pa.Table:
    """`score`'s scored rows of `tables`, called 50 rows at a time (the last 23), at one model batch."""
    stage = ScoreStage(str(decoder_dir), settings, "cpu", micro_batch=micro_batch)
    out = pa.concat_tables([stage(t) for t in rebatch(tables, 50)])
    return out.filter(pc.is_valid(out.column("score")))


def test_score_gives_the_calibrations_scores_at_any_micro_batch(tiny_decoder_dir, tiny_shards):
    """`train` calibrates by scoring its held-out images in model batches of 256, their embeddings
    computed apart (embed_pixels, batches of 256 with a short last one); `score` runs model batches of
    64 on a CPU and 1024 on a GPU. A quantile threshold sets the false-positive rate only if `score`
    gives each image the score it was calibrated with, whatever the model batch. Here at model batches
    of 1, 7, 64 and 1024, so short and padded ones, at the decoder's settings (no patch visible, so the
    masks are not exercised): bit for bit on the 2-core dev CPU (bf16); 1e-5 of the score, and a
    float16 step or two of the sketch, allowed for other CPUs' kernels. (A ViT encoder's bf16 matmuls
    round by batch shape: see docs/cli.md, "Batches".)"""
    meta = json.loads((tiny_decoder_dir / META).read_text())
    calibration = np.array(meta["calibration"]["scores"], np.float32)
    held_out = load_holdout(tiny_decoder_dir)
    threshold = resolve_threshold(parse_rule(DEFAULT_RULE), calibration)
    read = [t for s in expand_shards(str(tiny_shards)) for t in read_shard(s.url, s.stem, TINY_SIZE)]
    runs = {micro: scored_at(tiny_decoder_dir, read, meta["scoring"], micro) for micro in (1, 7, 64, 1024)}
    keys = runs[64].column("key").to_pylist()
    held = split_holdout(keys, meta["training"]["holdout"])[1]  # as `train` chose them
    assert len(keys) == 120 and len(held) == len(calibration) == 6
    flags = np.asarray(runs[64].column("score")) > threshold
    assert 0 < flags.sum() < 120  # the threshold splits the set: the flags below compare something
    for micro, run in runs.items():
        score, std = (np.asarray(run.column(name)) for name in ("score", "score_std"))
        sketch = np.stack(run.column("sketch").to_numpy(zero_copy_only=False)).astype(np.float32)
        np.testing.assert_allclose(sketch[held], held_out.sketches, atol=1e-3, err_msg=f"{micro}")
        np.testing.assert_allclose(score, runs[64].column("score"), rtol=1e-5, err_msg=f"{micro}")
        np.testing.assert_allclose(std, runs[64].column("score_std"), rtol=1e-5, atol=1e-7)
        assert np.array_equal(score > threshold, flags), f"micro-batch {micro}"
        np.testing.assert_allclose(score[held], calibration, rtol=1e-5, err_msg=f"{micro}")


def test_given_embeddings_score_as_the_encoders_own(scorer_parts, tiny_encoder):
    decoder, pixels, seeds = scorer_parts
    scorer = Scorer(tiny_encoder, decoder, one_aggregate(0.75, num_masks=2), micro_batch=8)
    own = scorer.score(pixels, seeds)
    given = scorer.score(pixels, seeds, embed_pixels(tiny_encoder, pixels))
    assert np.allclose(given.score, own.score, rtol=1e-5) and np.allclose(
        given.embedding_norm, own.embedding_norm
    )
    other = scorer.score(pixels, seeds, embed_pixels(tiny_encoder, pixels[::-1].copy()))
    assert not np.allclose(other.score, own.score)  # the embeddings given are the ones used


def test_more_masks_average_distinct_masks(scorer_parts, tiny_encoder):
    decoder, pixels, seeds = scorer_parts  # 16 patches: 0.75 keeps 4 visible

    def run(k):
        return Scorer(tiny_encoder, decoder, one_aggregate(0.75, num_masks=k), micro_batch=8).score(
            pixels, seeds
        )

    one, three = run(1), run(3)
    assert (one.score_std == 0).all() and (three.score_std > 0).all()
    assert not np.allclose(one.score, three.score)


def test_no_visible_patch_means_one_pass(scorer_parts, tiny_encoder):
    decoder, pixels, seeds = scorer_parts  # 16 patches: 0.99 keeps none
    scores = Scorer(tiny_encoder, decoder, one_aggregate(0.99, num_masks=4), micro_batch=8).score(
        pixels, seeds
    )
    assert (scores.score_std == 0).all()


def test_pooled_scores_are_at_most_the_per_pixel_ones(scorer_parts, tiny_encoder):
    decoder, pixels, seeds = scorer_parts
    per_pixel, pooled = (
        Scorer(tiny_encoder, decoder, one_aggregate(error_pool=p, error="mse", relax_steps=0), micro_batch=8)
        .score(pixels, seeds)
        .score
        for p in (1, 2)
    )
    assert (pooled < per_pixel).all()  # per patch, the square of a block mean is at most its mean square


def _first_mask_latent(decoder, tiny_encoder, pixels, seeds, ratio):
    x = tiny_encoder.normalize(torch.from_numpy(pixels))
    noise = mask_noise(torch.from_numpy(seeds), decoder.config.num_patches, 0)
    with torch.no_grad():
        return x, *decoder.forward_encoder(x, tiny_encoder.embed(x), ratio, noise)


def test_relaxation_moves_only_the_embedding_token_in_whole_steps_within_its_radius(
    scorer_parts, tiny_encoder
):
    decoder, pixels, seeds = scorer_parts
    settings = ScoreSettings(0.75, relax_steps=4, relax_radius=0.2)
    x, latent, mask, ids_restore = _first_mask_latent(decoder, tiny_encoder, pixels, seeds, 0.75)
    with torch.no_grad():
        relaxed = relax_token(
            decoder, x, latent, mask, ids_restore, settings, torch.zeros(len(x), dtype=torch.bool)
        )
    assert torch.equal(relaxed[:, 1:], latent[:, 1:])  # the visible patches' tokens are the image's
    steps = (relaxed[:, 0] - latent[:, 0]).abs() / 0.05
    assert torch.allclose(steps, steps.round(), atol=1e-3)  # +-0.05 per step in every coordinate
    assert steps.round().max() == 4 and set(steps.round().unique().tolist()) <= {0.0, 2.0, 4.0}


def _with_axis_rows(pixels: np.ndarray, tiny_encoder) -> np.ndarray:
    """The images' embeddings, the first 8 moved onto one feature alone (no sketch)."""
    embeddings = embed_pixels(tiny_encoder, pixels)
    embeddings[:8] = 0
    embeddings[:8, 5] = np.linspace(1, 4, 8)
    return embeddings


def test_an_embedding_on_one_axis_is_scored_by_the_axis_aggregate_on_the_aggregates_scale(
    scorer_parts, tiny_encoder
):
    """Rows whose embedding sits on one feature take axis_aggregate of axis_error (the mean of squared
    errors by default; relaxation included) put on the aggregate's scale by the AxisScale, mask by
    mask; the others the aggregate of the error (q25 of 1 - SSIM). Each row as if every row were scored
    so. A Scorer refuses a scale it cannot use and settings without the scale they need."""
    decoder, pixels, seeds = scorer_parts
    embeddings = _with_axis_rows(pixels, tiny_encoder)
    scale = AxisScale(np.array([0.0, 0.5, 1.0]), np.array([0.0, 0.1, 0.3]))
    by = {
        name: Scorer(tiny_encoder, decoder, settings, axis_scale).score(pixels, seeds, embeddings)
        for name, settings, axis_scale in (
            ("q25", one_aggregate(), None),
            ("default", ScoreSettings(), scale),
            ("mean", ScoreSettings().alone("mean", "mse"), None),
        )
    }
    assert (by["q25"].axis[:8] == 5).all() and (by["q25"].axis[8:] == -1).all()
    default = ScoreSettings()
    assert (default.aggregate, default.error, default.axis_aggregate, default.axis_error) == (
        "q25",
        "ssim",
        "mean",
        "mse",
    )
    mixed = by["default"]
    np.testing.assert_allclose(mixed.per_mask[:8], scale(by["mean"].per_mask[:8]), rtol=1e-5)
    np.testing.assert_allclose(mixed.per_mask[8:], by["q25"].per_mask[8:], rtol=1e-5)
    assert np.array_equal(mixed.score, mixed.per_mask.mean(1))
    assert np.array_equal(mixed.score_std, mixed.per_mask.std(1))
    for settings, wrong in ((ScoreSettings(), None), (one_aggregate(), scale)):
        with pytest.raises(ValueError, match="an AxisScale goes with an axis aggregate of its own"):
            Scorer(tiny_encoder, decoder, settings, wrong)


def test_axis_scale_matches_the_held_out_errors_by_rank():
    """Each held-out error by the axis aggregate goes to the aggregate's error of the same rank; between
    them linearly; above the last along the knots' slope (the worst keep their order); below the first
    to the first. More values than AXIS_SCALE_KNOTS keep quantiles on an even grid."""
    rng = np.random.default_rng(0)
    by_axis, by_aggregate = rng.gamma(2.0, 0.3, 200), rng.gamma(5.0, 0.02, 200)
    scale = AxisScale.fit(by_axis, by_aggregate)
    assert np.array_equal(scale.source, np.sort(by_axis)) and np.array_equal(
        scale.target, np.sort(by_aggregate)
    )
    np.testing.assert_allclose(
        scale(by_axis), np.sort(by_aggregate)[np.argsort(np.argsort(by_axis))].astype(np.float32)
    )
    top, slope = scale.source[-1], np.ptp(scale.target) / np.ptp(scale.source)
    assert scale(np.array([top + 1.0]))[0] == np.float32(scale.target[-1] + slope)
    assert scale(np.array([-5.0]))[0] == np.float32(scale.target[0])
    assert np.isnan(scale(np.array([np.nan]))[0]) and scale(by_axis).dtype == np.float32
    again = AxisScale.from_dict(json.loads(json.dumps(scale.to_dict())))
    assert np.array_equal(again.source, scale.source) and np.array_equal(again.target, scale.target)
    many = AxisScale.fit(rng.random((3000, 2)), rng.random((3000, 2)))
    assert len(many.source) == AXIS_SCALE_KNOTS and (np.diff(many.source) >= 0).all()
    flat = AxisScale.fit(np.ones(5), np.arange(5.0))  # no spread: slope 1 above it
    assert flat(np.array([3.0]))[0] == 6.0


def test_calibrate_scores_the_held_out_images_as_the_scorer_with_its_scale(scorer_parts, tiny_encoder):
    """With an axis aggregate of its own, the calibration fits the scale on every held-out image scored
    by each aggregate alone, and its scores are what Scorer(settings, scale) gives them; with one
    aggregate, no scale and the plain scores."""
    decoder, pixels, seeds = scorer_parts
    embeddings = _with_axis_rows(pixels, tiny_encoder)

    def held_out(settings: ScoreSettings) -> Scores:
        return Scorer(tiny_encoder, decoder, settings).score(pixels, seeds, embeddings)

    settings = ScoreSettings(num_masks=2)
    calibration, scale = calibrate(held_out, settings)
    alone = {a: held_out(settings.alone(a, e)).per_mask for a, e in (("q25", "ssim"), ("mean", "mse"))}
    assert np.array_equal(scale.source, np.sort(alone["mean"].ravel()))
    assert np.array_equal(scale.target, np.sort(alone["q25"].ravel()))
    again = Scorer(tiny_encoder, decoder, settings, scale).score(pixels, seeds, embeddings)
    np.testing.assert_allclose(calibration.score, again.score, rtol=1e-5)
    plain, none = calibrate(held_out, one_aggregate(num_masks=2))
    assert none is None and np.array_equal(plain.score, alone["q25"].mean(1))


def test_a_decoder_scores_an_axis_aggregate_only_with_its_own_scale():
    """axis_scale_for: none for one aggregate; the saved scale for the pair it was fitted for; for any
    other pair, or a decoder saved without a scale, a message that says what to train."""
    scale = AxisScale(np.array([0.0, 1.0]), np.array([0.0, 0.5]))
    axis_mean = ScoreSettings()
    meta = {
        "scoring": axis_mean.to_dict(),
        "calibration": {"n": 2, "scores": [0, 1], "axis_scale": scale.to_dict()},
    }
    assert axis_scale_for(meta, one_aggregate()) is None
    assert np.array_equal(axis_scale_for(meta, replace(axis_mean, num_masks=8)).target, scale.target)
    default = "--aggregate q25 --axis-aggregate mean --error ssim --axis-error mse"
    with pytest.raises(
        UsageError,
        match=r"^--aggregate q25 --axis-aggregate median --error ssim --axis-error mse needs a decoder "
        r"calibrated with them \(train --aggregate q25 --axis-aggregate median --error ssim "
        r"--axis-error mse\), "
        r"or every row measured alike \(--axis-aggregate q25 --axis-error ssim\).*"
        f"made for {default}$",
    ):
        axis_scale_for(meta, ScoreSettings(axis_aggregate="median"))
    with pytest.raises(UsageError, match=f"--axis-error ssim needs a decoder .* made for {default}$"):
        axis_scale_for(meta, replace(axis_mean, axis_error="ssim"))  # session 44's default, another scale
    q25 = {"scoring": one_aggregate().to_dict(), "calibration": {"n": 2, "scores": [0, 1]}}
    with pytest.raises(
        UsageError, match="made for --aggregate q25 --axis-aggregate q25 --error ssim --axis-error ssim$"
    ):
        axis_scale_for(q25, axis_mean)
    before = {"scoring": axis_mean.to_dict(), "calibration": {"n": 2, "scores": [0, 1]}}  # session 43's
    with pytest.raises(UsageError, match=f"made for {default} before that scale existed$"):
        axis_scale_for(before, axis_mean)


def test_relaxation_lowers_the_error_and_zero_steps_is_the_plain_rebuild(scorer_parts, tiny_encoder):
    decoder, pixels, seeds = scorer_parts
    plain, relaxed = (
        Scorer(tiny_encoder, decoder, one_aggregate(0.99, relax_steps=k), micro_batch=8)
        .score(pixels, seeds)
        .score
        for k in (0, 3)
    )
    assert (relaxed < plain).mean() >= 0.95 and (relaxed != plain).all()
    x, latent, mask, ids_restore = _first_mask_latent(decoder, tiny_encoder, pixels, seeds, 0.99)
    with torch.no_grad():
        pred = decoder.forward_decoder(latent, ids_restore)
        by_hand = aggregate_errors(patch_error(decoder, x, pred, "ssim", 2), mask, "q25")
    assert np.allclose(plain, by_hand.numpy(), rtol=2e-2)  # the Scorer runs under autocast


def _ssim_by_hand(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM of two equal-shape arrays of values, from its textbook formula."""
    mx, my = x.mean(), y.mean()
    cov = ((x - mx) * (y - my)).mean()
    num = (2 * mx * my + SSIM_C1) * (2 * cov + SSIM_C2)
    return num / ((mx**2 + my**2 + SSIM_C1) * (x.var() + y.var() + SSIM_C2))


def test_patch_dissimilarity_is_one_minus_ssim_per_channel_averaged():
    dec = DedeDecoder(DedeConfig(image_size=16, embed_dim=4, patch_size=8, width=24, heads=2))
    gen = torch.Generator().manual_seed(0)
    imgs = torch.randn(2, 3, 16, 16, generator=gen)
    rebuilt = torch.randn(2, 3, 16, 16, generator=gen)
    pred = dec.patchify(rebuilt)
    got = patch_dissimilarity(dec, imgs, pred, pool=1)
    assert got.shape == (2, 4)
    # patch 3 of image 1: rows 8-15, columns 8-15
    x, y = imgs[1, :, 8:, 8:].double().numpy(), rebuilt[1, :, 8:, 8:].double().numpy()
    expected = 1 - np.mean([_ssim_by_hand(x[c], y[c]) for c in range(3)])
    assert got[1, 3].item() == pytest.approx(expected, rel=1e-5)
    assert torch.allclose(
        patch_dissimilarity(dec, imgs, dec.patchify(imgs), pool=1), torch.zeros(2, 4), atol=1e-6
    )
    pooled = patch_dissimilarity(dec, imgs, pred, pool=2)
    xp, yp = (torch.nn.functional.avg_pool2d(t, 2)[1, :, 4:, 4:].double().numpy() for t in (imgs, rebuilt))
    assert pooled[1, 3].item() == pytest.approx(
        1 - np.mean([_ssim_by_hand(xp[c], yp[c]) for c in range(3)]), rel=1e-5
    )


def test_ssim_error_is_relative_to_the_patch_contrast():
    """The same relative mistake (the right pattern, a fifth too faint) costs about the same SSIM
    error at any contrast, while its squared error grows with the square of the contrast: textured
    clean images are not ranked as worse rebuilt just for holding more."""
    dec = DedeDecoder(DedeConfig(image_size=8, embed_dim=4, patch_size=8, width=24, heads=2))
    gen = torch.Generator().manual_seed(1)
    pattern = torch.randn(1, 3, 8, 8, generator=gen)
    errors = {}
    for contrast in (1.0, 3.0):
        imgs = contrast * pattern
        pred = dec.patchify(0.8 * imgs)  # right structure, a fifth too faint
        errors[contrast] = (
            patch_dissimilarity(dec, imgs, pred, pool=1).item(),
            dec.patch_errors(imgs, pred).item(),
        )
    (ssim_low, mse_low), (ssim_high, mse_high) = errors[1.0], errors[3.0]
    assert mse_high == pytest.approx(9 * mse_low, rel=1e-4)
    assert ssim_high == pytest.approx(ssim_low, rel=0.25) and ssim_high < 0.05
    wrong = dec.patchify(torch.randn(1, 3, 8, 8, generator=gen))  # another pattern, same scale
    assert patch_dissimilarity(dec, pattern, wrong, pool=1).item() > 0.5
