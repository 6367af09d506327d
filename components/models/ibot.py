"""iBOT: Image BERT pre-training with an Online Tokenizer (Zhou et al. 2021).

One piece per part of the paper, named after bytedance/ibot (``models/head.py: iBOTHead``,
``main_ibot.py: iBOTLoss``, ``models/vision_transformer.py: prepare_tokens``):

- :class:`IBOTHead` (Sec. 3.3, App. A): 3-layer MLP (GELU) to a bottleneck, L2-normalisation and a
  weight-normalised linear layer without bias; one head shared by [CLS] and patch tokens by default.
- :class:`IBOTViT` (Sec. 3.2): the shared timm ViT encoder with a learned mask embedding that
  replaces the masked patch embeddings *before* the position embedding is added
  (``prepare_tokens``), run per crop resolution as in DINO's ``MultiCropWrapper``; local crops get the
  position embedding resampled (bicubic, ``scale_factor = (n + 0.1) / N``, no antialiasing) to their
  grid, as ``interpolate_pos_encoding`` does.
- :class:`IBOTLoss` (Eq. 1-2, Sec. 3.2): [CLS] self-distillation over cross-view pairs (local crops
  included) and masked-image-modelling distillation over same-view pairs on masked patches, each
  image normalised by its number of masked patches; two centres (momentum 0.9) and sharpening with
  the teacher temperatures, all-reduced across processes.
- the EMA teacher (the "online tokenizer") is :func:`components.training.ema.ema_update` with
  :func:`teacher_momentum`.
- :func:`create_ibot_pair`: the student and its teacher in one call (a notebook's way in, as
  :class:`components.models.mae.MaskedAutoencoder` is for MAE).

The training step (teacher forward, student forward, loss, frozen last layer, EMA) is
:class:`components.training.ibot.IBOTTraining`, beside the other training code.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from components.models.vit import ViTSpec, create_vit
from components.training.ema import copy_as_teacher
from components.training.schedules import cosine


# --------------------------------------------------------------------------------------------- head
class IBOTHead(nn.Module):
    """Projection head (iBOT ``iBOTHead``, DINO ``DINOHead``).

    ``forward(tokens [B, 1 + L, D]) -> (cls_logits [B, out_dim], patch_logits [B, L, patch_out_dim])``.
    With ``norm_last_layer`` the weight-norm magnitude g stays fixed at 1 (DINO's stabiliser).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 8192,
        patch_out_dim: int = 8192,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
        shared_head: bool = True,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"the head needs at least one layer, got nlayers={nlayers}")
        if shared_head and out_dim != patch_out_dim:
            raise ValueError(f"a shared head needs out_dim == patch_out_dim, got {out_dim} and {patch_out_dim}")
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = self._weight_normed(bottleneck_dim, out_dim, norm_last_layer)
        self.last_layer2 = (
            self.last_layer if shared_head else self._weight_normed(bottleneck_dim, patch_out_dim, norm_last_layer)
        )

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @staticmethod
    def _weight_normed(in_dim: int, out_dim: int, norm_last_layer: bool) -> nn.Module:
        layer = nn.utils.parametrizations.weight_norm(nn.Linear(in_dim, out_dim, bias=False))
        g = layer.parametrizations.weight.original0  # [out_dim, 1]: the per-output magnitude
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(not norm_last_layer)
        return layer

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.mlp(x)  # [B, 1 + L, bottleneck]
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x[:, 0]), self.last_layer2(x[:, 1:])  # [B, K], [B, L, K]


def last_layer_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The head's last-layer parameters, which iBOT freezes during the first epoch."""
    return [p for n, p in module.named_parameters() if ".last_layer" in f".{n}"]


def cancel_gradients_last_layer(module: nn.Module, epoch: int, freeze_last_layer_epochs: int) -> None:
    """DINO/iBOT ``cancel_gradients_last_layer``: drop the last layer's gradients while
    ``epoch < freeze_last_layer_epochs`` (AdamW then leaves those weights untouched)."""
    if epoch < freeze_last_layer_epochs:
        for p in last_layer_parameters(module):
            p.grad = None


# --------------------------------------------------------------------------------------------- network
class IBOTViT(nn.Module):
    """Encoder + learned mask embedding + iBOT head: the student, and (a copy of it) the teacher.

    ``forward(global_crops, local_crops=(), masks=None) -> dict`` with
    ``cls`` [(2 + n_local) * B, K] ordered crop by crop (global 1, global 2, local 1, ...),
    ``patch`` [2 * B, L, K'] for the global crops; ``masks`` (bool [B, G, G] per global crop)
    replace those patch embeddings by the mask embedding.
    """

    def __init__(self, encoder: VisionTransformer, head: IBOTHead) -> None:
        super().__init__()
        if encoder.num_prefix_tokens != 1 or getattr(encoder, "no_embed_class", False):
            raise ValueError("IBOTViT needs a ViT with exactly one [CLS] token and a pos embed that covers it")
        self.encoder = encoder
        self.head = head
        # iBOT ``masked_embed``: zeros at start, learned; used by the student only.
        self.masked_embed = nn.Parameter(torch.zeros(1, encoder.embed_dim))

    def pos_embed_for(self, h: int, w: int) -> torch.Tensor:
        """The encoder's position embedding for an ``h x w`` patch grid ([1, 1 + h*w, D]), as iBOT's
        ``interpolate_pos_encoding`` (from DINO) makes it for local crops: the [CLS] row unchanged, the
        patch table resized bicubically (no antialiasing) with ``scale_factor = (h + 0.1) / gh`` per axis
        -- the 0.1 avoids a floating-point floor one row short (DINO issue #8); PyTorch then maps output
        to input coordinates with that scale, not with the size ratio."""
        gh, gw = self.encoder.patch_embed.grid_size
        pos = self.encoder.pos_embed  # [1, 1 + gh*gw, D]
        if (h, w) == (gh, gw):
            return pos
        dim = pos.shape[-1]
        table = pos[:, 1:].reshape(1, gh, gw, dim).permute(0, 3, 1, 2)  # [1, D, gh, gw]
        table = F.interpolate(table, scale_factor=((h + 0.1) / gh, (w + 0.1) / gw), mode="bicubic", align_corners=False)
        if table.shape[-2:] != (h, w):
            raise ValueError(f"resampling the {gh}x{gw} position table gave {tuple(table.shape[-2:])}, not {h}x{w}")
        table = table.permute(0, 2, 3, 1).reshape(1, h * w, dim)  # [1, h*w, D]
        return torch.cat([pos[:, :1], table], dim=1)

    def prepare_tokens(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Patch embed, mask embedding on masked patches, [CLS], position embedding (iBOT Sec. 3.2)."""
        enc = self.encoder
        B = x.shape[0]
        x = enc.patch_embed.proj(x)  # [B, D, h, w]
        h, w = x.shape[-2:]
        x = enc.patch_embed.norm(x.flatten(2).transpose(1, 2))  # [B, L, D]
        if mask is not None:
            if mask.shape != (B, h, w):
                raise ValueError(
                    f"mask of shape {tuple(mask.shape)} does not fit a batch of {B} crops with a {h}x{w} patch grid"
                )
            x = torch.where(mask.reshape(B, h * w, 1), self.masked_embed.to(x.dtype), x)  # [B, L, D]
        x = torch.cat([enc.cls_token.expand(B, -1, -1), x], dim=1)  # [B, 1 + L, D]
        x = x + self.pos_embed_for(h, w)
        return enc.norm_pre(enc.patch_drop(enc.pos_drop(x)))

    def forward_encoder(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """All output tokens after the final norm: [B, 1 + L, D]."""
        x = self.prepare_tokens(x, mask)
        x = self.encoder.blocks(x)
        return self.encoder.norm(x)

    def forward(self, global_crops, local_crops=(), masks=None) -> dict[str, torch.Tensor]:
        g = torch.cat(list(global_crops))  # [2B, 3, Sg, Sg]
        m = torch.cat(list(masks)) if masks is not None else None  # [2B, G, G]
        cls_g, patch_g = self.head(self.forward_encoder(g, m))  # [2B, K], [2B, L, K']
        cls = [cls_g]
        if len(local_crops):
            loc = torch.cat(list(local_crops))  # [nB, 3, Sl, Sl]
            tokens = self.forward_encoder(loc)  # [nB, 1 + l, D]
            cls.append(self.head(tokens[:, :1])[0])  # [CLS] only: the MIM term uses global crops
        return {"cls": torch.cat(cls), "patch": patch_g}


# --------------------------------------------------------------------------------------------- loss
def teacher_probs(logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    """Centring and sharpening of the teacher's output: softmax((t - c) / tau_t)."""
    return F.softmax((logits.float() - center) / temp, dim=-1)


def cross_entropy(teacher_p: torch.Tensor, student_logits: torch.Tensor, student_temp: float) -> torch.Tensor:
    """-sum_k P_t log P_s over the last dim: [..., K] -> [...]."""
    return torch.sum(-teacher_p * F.log_softmax(student_logits.float() / student_temp, dim=-1), dim=-1)


class IBOTLoss(nn.Module):
    """L = lambda1 * L_[CLS] + lambda2 * L_MIM (iBOT Eq. 1-2), with its two centres as buffers.

    ``forward(student_cls, student_patch, teacher_cls, teacher_patch, masks, teacher_temp,
    teacher_patch_temp)``: student_cls [(2 + n) * B, K] and teacher_cls [2B, K] ordered crop by crop;
    student_patch / teacher_patch [2B, L, K']; masks [2B, L] or [2B, G, G] (True = masked in the
    student's view). Returns ``(loss, {"loss_cls", "loss_mim"})`` and updates the centres.
    """

    def __init__(
        self,
        out_dim: int,
        patch_out_dim: int,
        num_global: int = 2,
        num_local: int = 10,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        center_momentum2: float = 0.9,
        lambda1: float = 1.0,
        lambda2: float = 1.0,
    ) -> None:
        super().__init__()
        self.num_global, self.num_local = num_global, num_local
        self.student_temp = student_temp
        self.center_momentum, self.center_momentum2 = center_momentum, center_momentum2
        self.lambda1, self.lambda2 = lambda1, lambda2
        self.register_buffer("center", torch.zeros(1, out_dim))  # [1, K]
        self.register_buffer("center2", torch.zeros(1, 1, patch_out_dim))  # [1, 1, K']

    def cls_distillation(self, student_cls: torch.Tensor, teacher_p: torch.Tensor) -> torch.Tensor:
        """[CLS] self-distillation averaged over cross-view pairs (teacher view q != student view v)."""
        s = student_cls.chunk(self.num_global + self.num_local)  # views x [B, K]
        t = teacher_p.chunk(self.num_global)
        terms = [
            cross_entropy(t[q], s[v], self.student_temp).mean() for q in range(len(t)) for v in range(len(s)) if v != q
        ]
        return torch.stack(terms).mean()

    def mim_distillation(
        self, student_patch: torch.Tensor, teacher_patch_p: torch.Tensor, masks: torch.Tensor
    ) -> torch.Tensor:
        """MIM averaged over same-view pairs: per image, the cross-entropy summed over masked patches
        and divided by ``mask.sum().clamp(min=1)`` (an unmasked image contributes 0), then the batch mean."""
        s = student_patch.chunk(self.num_global)  # views x [B, L, K']
        t = teacher_patch_p.chunk(self.num_global)
        m = masks.flatten(1).float().chunk(self.num_global)  # views x [B, L]
        terms = []
        for v in range(self.num_global):
            per_patch = cross_entropy(t[v], s[v], self.student_temp)  # [B, L]
            per_image = (per_patch * m[v]).sum(dim=-1) / m[v].sum(dim=-1).clamp(min=1.0)  # [B]
            terms.append(per_image.mean())
        return torch.stack(terms).mean()

    @torch.no_grad()
    def update_center(self, teacher_cls: torch.Tensor, teacher_patch: torch.Tensor) -> None:
        """EMA of the batch means (all-reduced): c <- m c + (1 - m) mean(t); the patch centre uses the
        mean over patches of each image, then over images."""
        cls_center = teacher_cls.float().sum(dim=0, keepdim=True)  # [1, K]
        patch_center = teacher_patch.float().mean(dim=1).sum(dim=0, keepdim=True)  # [1, K']
        n = torch.tensor(float(teacher_cls.shape[0]), device=cls_center.device)
        if dist.is_available() and dist.is_initialized():
            for t in (cls_center, patch_center, n):
                dist.all_reduce(t)
        self.center.mul_(self.center_momentum).add_(cls_center / n, alpha=1 - self.center_momentum)
        self.center2.mul_(self.center_momentum2).add_((patch_center / n).unsqueeze(0), alpha=1 - self.center_momentum2)

    def forward(
        self,
        student_cls: torch.Tensor,
        student_patch: torch.Tensor,
        teacher_cls: torch.Tensor,
        teacher_patch: torch.Tensor,
        masks: torch.Tensor,
        teacher_temp: float,
        teacher_patch_temp: float,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        teacher_cls, teacher_patch = teacher_cls.detach(), teacher_patch.detach()
        t_cls = teacher_probs(teacher_cls, self.center, teacher_temp)  # [2B, K]
        t_patch = teacher_probs(teacher_patch, self.center2, teacher_patch_temp)  # [2B, L, K']
        loss_cls = self.cls_distillation(student_cls, t_cls) * self.lambda1
        loss_mim = self.mim_distillation(student_patch, t_patch, masks) * self.lambda2
        self.update_center(teacher_cls, teacher_patch)
        return loss_cls + loss_mim, {"loss_cls": float(loss_cls.detach()), "loss_mim": float(loss_mim.detach())}


# --------------------------------------------------------------------------------------------- schedules
def teacher_momentum(step: int, total_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """EMA momentum of the teacher, cosine from ``base`` to ``final`` per iteration (iBOT Sec. 3.3)."""
    return cosine(step, total_steps, base, final)


def teacher_temperature(epoch: int, warmup_epochs: int, warmup_temp: float = 0.04, temp: float = 0.07) -> float:
    """Teacher temperature per epoch (iBOT Sec. 4.1): ``main_ibot.py``'s ``np.linspace(warmup_temp, temp,
    warmup_epochs)`` over the first ``warmup_epochs`` epochs -- ``temp`` is reached at epoch
    ``warmup_epochs - 1`` -- then ``temp``."""
    if epoch >= warmup_epochs:
        return temp
    return warmup_temp + (temp - warmup_temp) * epoch / max(warmup_epochs - 1, 1)


# --------------------------------------------------------------------------------------------- diagnostics
@torch.no_grad()
def output_entropy(probs: torch.Tensor) -> dict[str, float]:
    """Collapse diagnostics of a teacher's distribution (DINO Sec. 5.3, Fig. 7): ``entropy`` = mean
    per-image entropy H(P(x)), ``marginal_entropy`` = H(E_x P(x)), and their difference ``kl`` =
    E_x KL(P(x) || E P), the information the output carries about the image. A constant output gives
    kl = 0 (collapse to one dimension: both entropies 0; to uniform: both log K)."""
    p = probs.float().reshape(-1, probs.shape[-1])  # [N, K]
    ent = -(p * p.clamp_min(1e-12).log()).sum(dim=-1).mean()
    mean_p = p.mean(dim=0)
    marg = -(mean_p * mean_p.clamp_min(1e-12).log()).sum()
    return {"entropy": float(ent), "marginal_entropy": float(marg), "kl": float(marg - ent)}


# --------------------------------------------------------------------------------------------- the pair
def create_ibot_pair(
    spec: ViTSpec,
    out_dim: int = 8192,
    patch_out_dim: int = 8192,
    hidden_dim: int = 2048,
    bottleneck_dim: int = 256,
    nlayers: int = 3,
    norm_last_layer: bool = True,
    shared_head: bool = True,
    drop_path: float = 0.1,
) -> tuple[IBOTViT, IBOTViT]:
    """iBOT's student and teacher (Sec. 3.2-3.3, ``main_ibot.py``): the ViT of ``spec`` (learned position
    embedding) with an :class:`IBOTHead`; the student with drop path ``drop_path``, the teacher without, an
    exact frozen copy of the student at step 0. The head's arguments are :class:`IBOTHead`'s."""

    def network(rate: float) -> IBOTViT:
        head = IBOTHead(
            spec.embed_dim, out_dim, patch_out_dim, hidden_dim, bottleneck_dim, nlayers, norm_last_layer, shared_head
        )
        return IBOTViT(create_vit(spec, drop_path_rate=rate, pos_embed="learned"), head)

    student = network(drop_path)
    teacher = copy_as_teacher(network(0.0), student)
    return student, teacher
