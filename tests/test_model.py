import pytest
import torch

from sanitizer.decoder_meta import DedeConfig
from sanitizer.errors import UsageError
from sanitizer.model import DedeDecoder, num_visible, run_blocks


def make(image_size=32, patch_size=4, **kw) -> DedeDecoder:
    return DedeDecoder(
        DedeConfig(image_size, 16, patch_size, width=32, depth=1, decoder_depth=1, heads=2, **kw)
    )


def test_patchify_round_trip_and_layout():
    dec = make()
    imgs = torch.randn(2, 3, 32, 32)
    patches = dec.patchify(imgs)
    assert patches.shape == (2, 64, 48)
    assert torch.equal(dec.unpatchify(patches), imgs)
    # Patch 1 is the second 4x4 block of the first row, channels last within the patch.
    assert torch.equal(patches[0, 1].view(4, 4, 3), imgs[0, :, 0:4, 4:8].permute(1, 2, 0))


@pytest.mark.parametrize(
    ("patches", "ratio", "visible"),
    [(64, 0.9, 6), (64, 0.75, 16), (64, 0.99, 0), (196, 0.99, 1), (196, 0.9, 19)],
)
def test_visible_patch_count(patches, ratio, visible):
    assert num_visible(patches, ratio) == visible
    x = torch.randn(3, patches, 8)
    kept, mask, ids_restore = DedeDecoder.random_masking(x, ratio, torch.rand(3, patches))
    assert kept.shape == (3, visible, 8)
    assert mask.sum(1).tolist() == [patches - visible] * 3
    assert sorted(ids_restore[0].tolist()) == list(range(patches))


def test_visible_patches_are_the_lowest_noise_ones():
    x = torch.arange(8.0).view(1, 8, 1)
    noise = torch.tensor([[5, 0, 7, 1, 6, 2, 3, 4]])
    kept, mask, _ = DedeDecoder.random_masking(x, 0.75, noise)
    assert kept.flatten().tolist() == [1.0, 3.0]
    assert mask.tolist() == [[1, 0, 1, 0, 1, 1, 1, 1]]


def test_loss_ignores_visible_patches():
    dec = make()
    imgs = torch.randn(2, 3, 32, 32)
    loss, pred, mask = dec(imgs, torch.randn(2, 16), 0.75, torch.rand(2, 64))
    visible = (mask == 0).unsqueeze(-1)
    changed_visible = pred.detach() + 100 * visible
    assert torch.allclose(dec.forward_loss(imgs, changed_visible, mask), loss, atol=1e-6)
    changed_hidden = pred.detach() + (~visible).float()
    assert dec.forward_loss(imgs, changed_hidden, mask) > loss + 0.5


def test_trimmed_loss_leaves_out_the_worst_rebuilt_images():
    dec = make()
    imgs = torch.randn(10, 3, 32, 32)
    pred = dec.patchify(imgs).clone()
    pred[:, :, 0] += torch.arange(1.0, 11.0).view(10, 1)  # image i is off by i + 1 in one pixel
    pred[3, :, 1] += 100.0  # image 3 is rebuilt worst of all
    pred.requires_grad_(True)
    mask = torch.ones(10, 64)
    per_image = dec.patch_errors(imgs, pred.detach()).mean(1)
    assert torch.allclose(dec.forward_loss(imgs, pred, mask), per_image.mean())
    trimmed = dec.forward_loss(imgs, pred, mask, trim=0.2)  # int(10 * 0.2) = 2 images left out
    left_out = per_image.argsort()[-2:]
    assert sorted(left_out.tolist()) == [3, 9]
    kept = torch.ones(10, dtype=torch.bool)
    kept[left_out] = False
    assert torch.allclose(trimmed, per_image[kept].mean())
    trimmed.backward()
    assert torch.all(pred.grad[left_out] == 0) and torch.all(pred.grad[kept].abs().sum((1, 2)) > 0)
    # A share that leaves out no whole image is the plain loss.
    assert torch.equal(dec.forward_loss(imgs, pred, mask, trim=0.09), dec.forward_loss(imgs, pred, mask))


def test_embedding_replaces_cls_output():
    dec = make()
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 64)
    emb = torch.randn(2, 16)
    latent, _, _ = dec.forward_encoder(imgs, emb, 0.9, noise)
    assert torch.allclose(latent[:, 0], dec.embedding_proj(emb))
    other, _, _ = dec.forward_encoder(imgs, emb * 2, 0.9, noise)
    assert torch.equal(latent[:, 1:], other[:, 1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_steps_lower_the_loss(dtype):
    """In fp32 and under CPU bf16 autocast (the precision on CPUs with bf16 hardware)."""
    dec = make()
    imgs, emb = torch.randn(16, 3, 32, 32) * 0.5 + 0.2, torch.randn(16, 16)
    opt = torch.optim.AdamW(dec.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss, _, _ = dec(imgs, emb, 0.9, torch.rand(16, 64, generator=gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_image_size_must_be_divisible_by_patch_size():
    with pytest.raises(UsageError, match="not divisible by patch size 5"):
        DedeConfig(image_size=32, embed_dim=8, patch_size=5)


def test_defaults_suit_the_input_size():
    assert DedeConfig.default_for(32, 512).patch_size == 8
    big = DedeConfig.default_for(224, 768)
    assert (big.patch_size, big.num_patches) == (16, 196)
    assert DedeConfig.default_for(32, 512, patch_size=4, width=None).patch_size == 4


def test_per_pixel_patch_errors_are_each_patch_mse():
    dec = make()
    imgs, pred = torch.randn(2, 3, 32, 32), torch.randn(2, 64, 48)
    expected = (pred - dec.patchify(imgs)).pow(2).mean(-1)
    assert torch.allclose(dec.patch_errors(imgs, pred), expected, atol=1e-6)


def test_pooled_errors_drop_texture_finer_than_the_block_and_keep_layout():
    dec = make()  # 4 px patches: an 8x8 grid
    imgs = torch.zeros(1, 3, 32, 32)
    checker = (torch.arange(32).view(-1, 1) + torch.arange(32)) % 2 * 2.0 - 1  # +-1, period 2
    rebuilt = checker.expand(1, 3, 32, 32).clone()
    rebuilt[..., 4:8, 8:12] += 0.5  # one patch (row 1, column 2) also brighter on average
    pred = dec.patchify(rebuilt)
    per_pixel, pooled = dec.patch_errors(imgs, pred), dec.patch_errors(imgs, pred, pool=2)
    assert torch.allclose(per_pixel[0, :10], torch.ones(10)) and per_pixel[0, 10] > 1
    expected = torch.zeros(1, 64)
    expected[0, 10] = 0.25  # the offset survives pooling, the checkerboard does not
    assert torch.allclose(pooled, expected, atol=1e-6)


def test_weights_come_from_the_seed_alone():
    """Not from torch's global generator, which building one leaves as it was: decoders trained in
    parallel threads start as they would alone, and whatever draws from that generator meanwhile (the
    detection benchmark's next implant) draws what it would alone. Every parameter but the LayerNorms'
    is drawn."""
    config = DedeConfig(32, 16, 8, width=32, depth=1, decoder_depth=1, heads=2)
    torch.manual_seed(1)
    state = torch.get_rng_state()
    a = DedeDecoder(config, seed=3).state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(2)
    b = DedeDecoder(config, seed=3).state_dict()
    c = DedeDecoder(config, seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    drawn = [k for k in a if "norm" not in k and not k.endswith("bias")]
    assert drawn and all(not torch.equal(a[k], c[k]) for k in drawn)


def test_cpu_blocks_attend_with_the_plain_kernel_and_agree_with_the_fused_one():
    dec = make()
    x = torch.randn(4, 17, 32)
    fused = x
    for block in dec.decoder_blocks:
        block.attn.fused_attn = True
        fused = block(fused)
    plain = run_blocks(dec.decoder_blocks, x)
    assert not any(block.attn.fused_attn for block in dec.decoder_blocks)
    assert torch.allclose(plain, fused, atol=1e-5)
