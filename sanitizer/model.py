"""The DeDe decoder: an MAE-style network that rebuilds an image from a frozen encoder's embedding.

The patch encoder sees only the visible patches (plus a cls slot). Its cls output is REPLACED by a
linear projection of the victim embedding, so the decoder must rely on what the victim encoder says
about the image. With almost every patch hidden, a clean image is rebuilt close to itself, while a
triggered image (whose embedding points at the attacker's target) is not. Method names follow MAE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from sanitizer.decoder_meta import DedeConfig


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Visible patches kept at a mask ratio (MAE's rounding down: 0.99 of 64 keeps none)."""
    return int(num_patches * (1 - mask_ratio))


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    """The transformer blocks in turn, attending with the fused kernel on CUDA and with the plain
    softmax(QK^T)V on the CPU: over these 17 tokens PyTorch's CPU flash kernel made a bf16 training
    step 2x slower (and an fp32 one no faster) on the 2-core dev VM."""
    for block in blocks:
        block.attn.fused_attn = x.is_cuda
        x = block(x)
    return x


class DedeDecoder(nn.Module):
    def __init__(self, config: DedeConfig, seed: int = 0) -> None:
        """Weights drawn from `seed` alone, and torch's global generator left untouched: the layers
        are built on the meta device (their default initialisation would draw from it) and every
        parameter set from the seed, so that decoders built in parallel threads are each the same as
        when built one at a time, and so is whatever else draws from the global generator meanwhile
        (the detection benchmark implants a victim while the last one's decoders train)."""
        super().__init__()
        self.config = config
        with torch.device("meta"):
            self._build(config)
        self.to_empty(device="cpu")
        self._init_weights(torch.Generator().manual_seed(seed))

    def _build(self, c: DedeConfig) -> None:
        patch_dim = 3 * c.patch_size**2
        # Encoder over visible patches.
        self.patch_embed = nn.Linear(patch_dim, c.width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_patches + 1, c.width))
        self.blocks = nn.ModuleList(Block(c.width, c.heads, c.mlp_ratio) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.width)
        # The victim embedding takes the cls slot.
        self.embedding_proj = nn.Linear(c.embed_dim, c.width, bias=False)
        # Decoder over all patches.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.width))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, c.num_patches + 1, c.width))
        self.decoder_blocks = nn.ModuleList(
            Block(c.width, c.heads, c.mlp_ratio) for _ in range(c.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(c.width)
        self.decoder_pred = nn.Linear(c.width, patch_dim)

    def _init_weights(self, generator: torch.Generator) -> None:
        """Every parameter is set here: LayerNorms start at 1 and 0, the others are drawn."""
        for p in (self.cls_token, self.mask_token, self.pos_embed, self.decoder_pos_embed):
            nn.init.normal_(p, std=0.02, generator=generator)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight, generator=generator)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -- shapes ---------------------------------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, L, p*p*3), patches in row-major order."""
        p, g = self.config.patch_size, self.config.grid
        x = imgs.reshape(imgs.shape[0], 3, g, p, g, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(imgs.shape[0], g * g, p * p * 3)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, p*p*3) -> (B, 3, H, W); the inverse of patchify."""
        p, g = self.config.patch_size, self.config.grid
        x = x.reshape(x.shape[0], g, g, p, p, 3)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], 3, g * p, g * p)

    @staticmethod
    def random_masking(
        x: torch.Tensor, mask_ratio: float, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep the patches with the smallest noise; mask: 1 = hidden, 0 = visible.

        The noise is given rather than drawn here so that scoring can derive it from the sample key.
        """
        n, length, dim = x.shape
        keep = num_visible(length, mask_ratio)
        ids_shuffle = torch.argsort(noise, dim=1, stable=True)
        ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)
        ids_keep = ids_shuffle[:, :keep]
        x_visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
        mask = torch.ones(n, length, device=x.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return x_visible, mask, ids_restore

    # -- forward --------------------------------------------------------------------------------
    def forward_encoder(
        self, imgs: torch.Tensor, embedding: torch.Tensor, mask_ratio: float, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.patch_embed(self.patchify(imgs)) + self.pos_embed[:, 1:]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = self.norm(run_blocks(self.blocks, torch.cat([cls, x], dim=1)))
        # The victim embedding replaces the cls output: the decoder's global evidence.
        victim = self.embedding_proj(embedding.to(x.dtype)).unsqueeze(1)
        return torch.cat([victim, x[:, 1:]], dim=1), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        n, length = ids_restore.shape
        hidden = self.mask_token.expand(n, length + 1 - latent.shape[1], -1)
        x = torch.cat([latent[:, 1:], hidden.to(latent.dtype)], dim=1)
        x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = run_blocks(self.decoder_blocks, torch.cat([latent[:, :1], x], dim=1) + self.decoder_pos_embed)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def patch_blocks(self, imgs: torch.Tensor, pool: int = 1) -> torch.Tensor:
        """(B, 3, H, W) -> (B, L, 3, S): each patch's values per channel, after pool x pool block means."""
        if pool > 1:
            imgs = F.avg_pool2d(imgs, pool)
        n, g = imgs.shape[0], self.config.grid
        side = imgs.shape[-1] // g  # pixels (or pooled blocks) per patch side
        x = imgs.reshape(n, 3, g, side, g, side).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(n, g * g, 3, side * side)

    def patch_errors(self, imgs: torch.Tensor, pred: torch.Tensor, pool: int = 1) -> torch.Tensor:
        """Mean squared error of each patch, (B, L), in normalised pixel space.

        With pool > 1 the difference is first averaged over pool x pool pixel blocks: the error then
        measures the image's layout at that scale, not fine texture that no embedding carries.
        """
        diff = self.unpatchify(pred.float()) - imgs.float()
        return self.patch_blocks(diff, pool).pow(2).mean(dim=(2, 3))

    def forward_loss(
        self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, trim: float = 0.0
    ) -> torch.Tensor:
        """Mean squared error over hidden patches only: visible ones are given, not predicted.

        With trim > 0 the worst-rebuilt `trim` share of the batch is left out (a trimmed loss), so that
        the few images whose embedding does not describe them, the triggered ones, are not learned.
        """
        per_image = (self.patch_errors(imgs, pred) * mask).sum(1) / mask.sum(1).clamp(min=1)
        keep = per_image.shape[0] - int(per_image.shape[0] * trim)
        if keep < per_image.shape[0]:
            per_image = per_image.topk(keep, largest=False, sorted=False).values
        return per_image.mean()

    def forward(
        self,
        imgs: torch.Tensor,
        embedding: torch.Tensor,
        mask_ratio: float,
        noise: torch.Tensor,
        trim: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        latent, mask, ids_restore = self.forward_encoder(imgs, embedding, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask, trim), pred, mask
