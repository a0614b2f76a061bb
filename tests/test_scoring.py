import hashlib

import numpy as np
import pytest
import torch

from sanitizer.checkpoint import load_decoder
from sanitizer.errors import UsageError
from sanitizer.scoring import Scorer, ScoreSettings, aggregate_errors, key_seeds, mask_noise
from sanitizer.train import TrainSettings


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
    given = ScoreSettings(args.test_mask_ratio, args.num_masks, args.aggregate, args.error_pool)
    assert given == ScoreSettings()
    assert args.holdout == TrainSettings().holdout and args.mask_ratio == TrainSettings().mask_ratio
    assert args.trim == TrainSettings().trim


def test_settings_are_validated():
    with pytest.raises(UsageError, match="test-mask-ratio"):
        ScoreSettings(test_mask_ratio=1.0)
    with pytest.raises(UsageError, match="aggregate"):
        ScoreSettings(aggregate="max")
    with pytest.raises(UsageError, match="--error-pool must be at least 1, not 0"):
        ScoreSettings(error_pool=0)


def test_error_pool_must_divide_the_patch(tiny_decoder_dir, tiny_encoder):
    decoder, _ = load_decoder(tiny_decoder_dir)  # 8 px patches
    with pytest.raises(UsageError, match="--error-pool 3 does not divide the decoder's 8 px patches"):
        Scorer(tiny_encoder, decoder, ScoreSettings(error_pool=3))


def test_settings_saved_before_error_pool_existed_read_as_per_pixel():
    old = {"test_mask_ratio": 0.99, "num_masks": 2, "aggregate": "q25"}
    assert ScoreSettings.from_dict(old) == ScoreSettings(num_masks=2, error_pool=1)
    settings = ScoreSettings(num_masks=3, error_pool=4)
    assert ScoreSettings.from_dict(settings.to_dict()) == settings


@pytest.fixture(scope="module")
def scorer_parts(tiny_decoder_dir, tiny_encoder):
    decoder, meta = load_decoder(tiny_decoder_dir)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (23, 32, 32, 3), dtype=np.uint8)
    seeds = key_seeds([f"k{i}" for i in range(23)])
    return decoder, pixels, seeds


def test_scores_identical_across_batch_sizes_order_and_runs(scorer_parts, tiny_encoder):
    decoder, pixels, seeds = scorer_parts
    settings = ScoreSettings(num_masks=3)
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


def test_more_masks_average_distinct_masks(scorer_parts, tiny_encoder):
    decoder, pixels, seeds = scorer_parts  # 16 patches: 0.75 keeps 4 visible

    def run(k):
        return Scorer(tiny_encoder, decoder, ScoreSettings(0.75, num_masks=k), micro_batch=8).score(
            pixels, seeds
        )

    one, three = run(1), run(3)
    assert (one.score_std == 0).all() and (three.score_std > 0).all()
    assert not np.allclose(one.score, three.score)


def test_no_visible_patch_means_one_pass(scorer_parts, tiny_encoder):
    decoder, pixels, seeds = scorer_parts  # 16 patches: 0.99 keeps none
    scores = Scorer(tiny_encoder, decoder, ScoreSettings(0.99, num_masks=4), micro_batch=8).score(
        pixels, seeds
    )
    assert (scores.score_std == 0).all()


def test_pooled_scores_are_at_most_the_per_pixel_ones(scorer_parts, tiny_encoder):
    decoder, pixels, seeds = scorer_parts
    per_pixel, pooled = (
        Scorer(tiny_encoder, decoder, ScoreSettings(error_pool=p), micro_batch=8).score(pixels, seeds).score
        for p in (1, 2)
    )
    assert (pooled < per_pixel).all()  # per patch, the square of a block mean is at most its mean square
