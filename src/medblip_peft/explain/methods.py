"""The attribution methods, as a registry: name -> `Method` (a function plus its options and costs).

Every method takes a `CaptionTarget` and returns raw, signed patch scores of shape ``(tokens, rows, cols)``.
Costs are per explained caption with *T* tokens and *P* vision patches:

========================  ======================================  ===============================================
method                    passes                                  what it measures
========================  ======================================  ===============================================
``cross_attention``       1 forward                               where the decoder looked (not why)
``attention_rollout``     1 forward                               attention flow through the decoder's layers
``grad_x_attention``      1 forward + 1 decoder backward          attention weighted by its effect on log p(token)
``attention_ig``          T × n_steps decoder forward + backward  what concentrating the attention did to log p
``integrated_gradients``  T × n_steps forward + backward          patch-embedding path integral from a baseline
``occlusion``             1 + P forwards, no backward             log p(token) lost when a patch is blanked
========================  ======================================  ===============================================

The Captum methods batch their internal steps (``internal_batch_size`` for integrated gradients,
``perturbations_per_eval`` for occlusion), so memory stays bounded however many steps or patches there are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from medblip_peft.explain.core import CaptionTarget

__all__ = ["METHODS", "Method", "get_method", "register_method"]


@dataclass(frozen=True)
class Method:
    """A registered attribution method: its function, default options and a one-line cost."""

    name: str
    fn: Callable[..., torch.Tensor]
    defaults: dict[str, Any] = field(default_factory=dict)
    cost: str = ""
    summary: str = ""

    def resolve(self, options: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise TypeError(
                f"method {self.name!r} takes no option(s) {unknown}; its options are {sorted(self.defaults)}."
            )
        return {**self.defaults, **options}


METHODS: dict[str, Method] = {}


def register_method(
    name: str, *, defaults: dict[str, Any] | None = None, cost: str = "", summary: str = ""
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Decorator: add a method ``fn(target, **options) -> (T, rows, cols) tensor`` to `METHODS`."""

    def wrap(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        METHODS[name] = Method(name, fn, dict(defaults or {}), cost, summary)
        return fn

    return wrap


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown explanation method {name!r}; choose from {sorted(METHODS)}.") from None


# --- shared pieces -----------------------------------------------------------------------------------------
_ATTENTION_OPTIONS = {"layers": "all", "heads": "mean"}


def _layer_ids(layers: str | int | list[int], count: int) -> list[int]:
    """``"all"``, ``"last"``, an index (negative counts from the end) or a list of indices."""
    if layers == "all":
        return list(range(count))
    if layers == "last":
        return [count - 1]
    chosen = [layers] if isinstance(layers, int) else list(layers)
    if not chosen or any(not -count <= i < count for i in chosen):
        raise ValueError(f"`layers` must be 'all', 'last' or indices in [-{count}, {count}), got {layers!r}.")
    return [i % count for i in chosen]


def _reduce_heads(maps: torch.Tensor, heads: str | int) -> torch.Tensor:
    """Collapse the head axis (dim 1 of ``(T, heads, P)``): ``"mean"``, ``"max"`` or one head's index."""
    if heads == "mean":
        return maps.mean(1)
    if heads == "max":
        return maps.amax(1)
    if isinstance(heads, int) and -maps.shape[1] <= heads < maps.shape[1]:
        return maps[:, heads]
    raise ValueError(f"`heads` must be 'mean', 'max' or a head index below {maps.shape[1]}, got {heads!r}.")


def _query_rows(per_layer: list[torch.Tensor], target: CaptionTarget) -> torch.Tensor:
    """``(layers, T, heads, P)`` from per-layer ``(B, heads, text, 1 + P)`` maps.

    Token t takes the query row t − 1 (the position that predicts it) of batch row 0, or of batch row t when
    the batch holds one copy per token (as in grad × attention). Column 0, the vision [CLS] token, is dropped.
    """
    rows = target.positions - 1
    batch = per_layer[0].shape[0]
    pick = torch.arange(target.num_tokens, device=rows.device) if batch > 1 else torch.zeros_like(rows)
    return torch.stack([m[pick, :, rows, 1:] for m in per_layer])


def _to_grid(scores: torch.Tensor, target: CaptionTarget) -> torch.Tensor:
    return scores.reshape(target.num_tokens, *target.grid)


def _combine(maps: torch.Tensor, heads: str | int, target: CaptionTarget) -> torch.Tensor:
    """``(layers, T, heads, P)`` -> ``(T, rows, cols)``: collapse heads as asked, then average the layers."""
    return _to_grid(torch.stack([_reduce_heads(m, heads) for m in maps]).mean(0), target)


# --- attention methods --------------------------------------------------------------------------------------
@register_method(
    "cross_attention",
    defaults=dict(_ATTENTION_OPTIONS),
    cost="1 forward pass per caption",
    summary="Raw decoder cross-attention of the position that predicts each token.",
)
def cross_attention(target: CaptionTarget, *, layers: Any, heads: Any) -> torch.Tensor:
    with torch.no_grad():
        text = target.decode(target.image_embeds(), output_attentions=True)
    ids = _layer_ids(layers, len(text.cross_attentions))
    return _combine(_query_rows([text.cross_attentions[i] for i in ids], target), heads, target)


@register_method(
    "attention_rollout",
    defaults={"heads": "mean", "residual": 0.5},
    cost="1 forward pass per caption",
    summary="Attention rollout through the decoder: text self-attention carries earlier tokens' image evidence.",
)
def attention_rollout(target: CaptionTarget, *, heads: Any, residual: float) -> torch.Tensor:
    """Abnar & Zuidema's rollout, for a decoder: text-to-patch relevance ``R`` (text × (1 + P)) starts at 0;
    each layer's self-attention mixes it across earlier text positions (``R ← Â R`` with ``Â = r·I + (1−r)·A``),
    then cross-attention adds the image (``R ← r·R + (1−r)·A_cross``). With one decoder layer this is the
    cross-attention up to scale; it differs, and is meaningful, only when the decoder has several layers.
    """
    with torch.no_grad():
        text = target.decode(target.image_embeds(), output_attentions=True)
    length = target.input_ids.shape[1]
    eye = torch.eye(length, device=target.pixel_values.device)
    relevance = torch.zeros(length, text.cross_attentions[0].shape[-1], device=eye.device)
    for self_attn, cross_attn in zip(text.attentions, text.cross_attentions):
        mixed = _reduce_heads(self_attn[0].float().transpose(0, 1), heads)  # (text, text)
        relevance = (residual * eye + (1 - residual) * mixed) @ relevance
        image = _reduce_heads(cross_attn[0].float().transpose(0, 1), heads)  # (text, 1 + P)
        relevance = residual * relevance + (1 - residual) * image
    return _to_grid(relevance[target.positions - 1, 1:], target)


@register_method(
    "grad_x_attention",
    defaults=dict(_ATTENTION_OPTIONS),
    cost="1 forward + 1 backward pass per caption (batch = tokens)",
    summary="Cross-attention × its gradient w.r.t. log p(token), positive part (Chefer et al. 2021), via Captum.",
)
def grad_x_attention(target: CaptionTarget, *, layers: Any, heads: Any) -> torch.Tensor:
    from captum.attr import LayerGradientXActivation

    modules = target.cross_attention_modules()
    chosen = [modules[i] for i in _layer_ids(layers, len(modules))]
    # The vision tower runs once; the decoder runs on one copy of its output per token, each copy with its
    # own target column, so one batched backward gives every token's gradient. The attention module returns
    # (context, probabilities), and Captum's attributions follow that tuple.
    embeds = target.image_embeds_per_token()
    # With frozen weights (LoRA, or a model loaded for inference) nothing upstream of the attention would
    # require grad, and Captum could not differentiate through it; a grad-requiring input puts it in the graph.
    attributions = LayerGradientXActivation(target.logprobs_from_embeds, chosen).attribute(
        embeds.requires_grad_(True), target=list(range(target.num_tokens))
    )
    per_layer = [a[1] for a in (attributions if isinstance(attributions, list) else [attributions])]
    # Positive part per head before averaging (Chefer et al.): evidence for the token only.
    return _combine(_query_rows(per_layer, target).clamp(min=0), heads, target)


@register_method(
    "attention_ig",
    defaults={**_ATTENTION_OPTIONS, "n_steps": 16, "internal_batch_size": 16},
    cost="tokens × n_steps decoder forward + backward passes (vision tower once), in batches of "
    "internal_batch_size",
    summary="Integrated gradients on the cross-attention, from uniform attention to the model's (Hao et al. "
    "2021), positive part, via Captum.",
)
def attention_ig(
    target: CaptionTarget, *, layers: Any, heads: Any, n_steps: int, internal_batch_size: int
) -> torch.Tensor:
    """``(A − U) ⊙ ∫₀¹ ∂ log p / ∂A (U + α(A − U)) dα``, summed over query positions, positive part per head,
    heads and layers combined.

    Grad × attention reads the gradient at the model's own attention, where a confident token's log-probability
    is flat (p ≈ 1) and the gradient's sign is noise. Integrating along the path from uniform attention ``U``
    (every patch weighted alike) to ``A`` measures what concentrating the attention did to log p(token). The
    path moves every query position's attention, so evidence that an earlier position gathered and passed on
    through text self-attention counts too; summed over positions, layers, heads and patches (with the vision
    [CLS] column) the scores equal log p(token) minus its value under uniform attention.
    """
    ids = _layer_ids(layers, len(target.cross_attention_modules()))
    per_layer = attention_path_attributions(
        target, ids, n_steps=n_steps, internal_batch_size=internal_batch_size
    )
    # Batch row t explains token t; positions after the one that predicts t have no effect on it (zero scores).
    summed = torch.stack([m.sum(2)[..., 1:] for m in per_layer])  # (layers, T, heads, P)
    return _combine(summed.clamp(min=0), heads, target)


def attention_path_attributions(
    target: CaptionTarget, layer_ids: list[int], *, n_steps: int, internal_batch_size: int
) -> list[torch.Tensor]:
    """Signed integrated gradients of each token's log p on the chosen layers' cross-attention: one
    ``(T, heads, text, 1 + P)`` tensor per layer, whose batch row *t* explains token *t*.

    Every query position of every chosen layer moves together from uniform attention to the model's, and the
    values the attention mixes stay the image's own all along the path. So batch row *t*, summed over layers,
    heads, query positions and key positions, equals log p(t) minus log p(t) with uniform attention in those
    layers (completeness, up to the Riemann error of `n_steps`).
    """
    import warnings

    from captum.attr import LayerIntegratedGradients

    modules = target.attention_probability_modules()
    embeds = target.image_embeds_per_token()
    with warnings.catch_warnings():
        # Captum warns that a later layer depends on an earlier one. Here every chosen layer's attention is
        # replaced by its own point on the path, so the joint path is well defined (and complete).
        warnings.filterwarnings("ignore", message="Multiple layers provided")
        # Captum starts the path at the layer's output on a baseline *input*. On image embeddings of zero every
        # key is the key projection's bias, so each query scores all 1 + P positions alike: uniform attention.
        attributions = LayerIntegratedGradients(
            target.logprobs_from_embeds, [modules[i] for i in layer_ids]
        ).attribute(
            embeds,
            baselines=torch.zeros_like(embeds),
            target=list(range(target.num_tokens)),
            n_steps=n_steps,
            internal_batch_size=internal_batch_size,
        )
    return attributions if isinstance(attributions, list) else [attributions]


# --- perturbation and path methods on the image --------------------------------------------------------------
def _pixel_baseline(target: CaptionTarget, baseline: str | float | torch.Tensor) -> torch.Tensor | float:
    """``"mean"`` (0 after normalisation: the dataset's mean colour), ``"black"``, a number, or a tensor."""
    if isinstance(baseline, torch.Tensor):
        return baseline.to(target.pixel_values)
    if baseline == "mean":
        return 0.0
    if baseline == "black":
        # What a black pixel becomes after the processor's (x - mean) / std.
        return target.black.expand_as(target.pixel_values).contiguous()
    if isinstance(baseline, (int, float)):
        return float(baseline)
    raise ValueError(f"`baseline` must be 'mean', 'black', a number or a tensor, got {baseline!r}.")


@register_method(
    "integrated_gradients",
    defaults={"n_steps": 32, "internal_batch_size": 16, "baseline": "mean", "method": "gausslegendre"},
    cost="tokens × n_steps forward + backward passes, in batches of internal_batch_size",
    summary="Captum LayerIntegratedGradients on the vision patch embeddings, summed over channels.",
)
def integrated_gradients(
    target: CaptionTarget, *, n_steps: int, internal_batch_size: int, baseline: Any, method: str
) -> torch.Tensor:
    from captum.attr import LayerIntegratedGradients

    layer = target.core.vision_model.embeddings.patch_embedding
    n = target.num_tokens
    base = _pixel_baseline(target, baseline)
    base = base.expand(n, -1, -1, -1) if isinstance(base, torch.Tensor) else base
    attributions = LayerIntegratedGradients(target.token_logprobs, layer).attribute(
        target.pixel_values.expand(n, -1, -1, -1),
        baselines=base,
        target=list(range(n)),
        n_steps=n_steps,
        method=method,
        internal_batch_size=internal_batch_size,
    )  # (T, hidden, rows, cols): the patch-embedding conv's output
    return attributions.sum(1)


@register_method(
    "occlusion",
    defaults={"baseline": "mean", "perturbations_per_eval": 16},
    cost="⌈patches / perturbations_per_eval⌉ forward passes (no backward)",
    summary="Captum FeatureAblation with one feature per vision patch: log p(token) lost when it is blanked.",
)
def occlusion(target: CaptionTarget, *, baseline: Any, perturbations_per_eval: int) -> torch.Tensor:
    from captum.attr import FeatureAblation

    rows, cols = target.grid
    _, _, height, width = target.pixel_values.shape
    patch_ids = torch.arange(rows * cols, device=target.pixel_values.device).view(1, 1, rows, cols)
    feature_mask = patch_ids.repeat_interleave(height // rows, 2).repeat_interleave(width // cols, 3)
    with torch.no_grad():
        # The forward returns all T log-probabilities for one image, so each ablation pass scores every
        # token at once; Captum then gives one attribution map per output column.
        attributions = FeatureAblation(target.token_logprobs).attribute(
            target.pixel_values,
            baselines=_pixel_baseline(target, baseline),
            feature_mask=feature_mask,
            perturbations_per_eval=perturbations_per_eval,
        )
    attributions = attributions.reshape(target.num_tokens, -1, height, width)
    # Every pixel of a patch carries the patch's score; read one per patch.
    return attributions[:, 0, :: height // rows, :: width // cols]
