"""A plain dense ASIF, the reference the engine and the memory tools are tested against."""

import torch


def dense_asif(
    images,
    anchor_images,
    prompts,
    anchor_texts,
    prompt_class,
    num_classes,
    n,
    k,
    p,
    clamp,
    normalize,
    aggregation,
):
    """ASIF as the paper states it, with dense tensors and nothing clever."""

    def representation(x, anchors, norm):
        x = torch.nn.functional.normalize(x.double(), dim=1)
        anchors = torch.nn.functional.normalize(anchors[:n].double(), dim=1)
        sims = x @ anchors.T
        # Top k by value, ties to the lower anchor id (a stable sort keeps id order).
        order = sims.argsort(dim=1, descending=True, stable=True)[:, :k]
        keep = torch.zeros_like(sims, dtype=torch.bool).scatter_(1, order, True)
        values = sims.clamp_min(0) if clamp else sims
        dense = torch.where(keep, values**p, torch.zeros_like(values))
        return unit(dense) if norm else dense

    def unit(x):  # (normalize's eps of 1e-12 would leave a large p's tiny rows unnormalised)
        return x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)

    image_rr = representation(images, anchor_images, normalize == "both")
    prompt_rr = representation(prompts, anchor_texts, normalize in ("both", "prompt"))
    if aggregation == "mean":
        classes = torch.stack([prompt_rr[prompt_class == c].mean(0) for c in range(num_classes)])
        if normalize in ("both", "prompt"):
            classes = unit(classes)
        return image_rr @ classes.T
    prompt_scores = image_rr @ prompt_rr.T
    return torch.stack(
        [prompt_scores[:, prompt_class == c].max(1).values for c in range(num_classes)], dim=1
    )


def reference_for_cell(problem: dict, cell, options) -> torch.Tensor:
    """The reference scores (float32) for one engine grid cell of `problem` under `options`."""
    return dense_asif(
        problem["image_embeddings"],
        problem["anchor_image_embeddings"],
        problem["prompt_embeddings"],
        problem["anchor_text_embeddings"],
        problem["prompt_class"],
        problem["num_classes"],
        cell.n,
        cell.k,
        cell.p,
        options.clamp_negative,
        options.normalize,
        options.template_aggregation,
    ).float()


def random_embeddings(g, images, anchors, classes, templates, d_image, d_text) -> dict:
    """A random zero-shot problem (evaluate_grid's keyword arguments, less the grid)."""
    return dict(
        image_embeddings=torch.randn(images, d_image, generator=g),
        anchor_image_embeddings=torch.randn(anchors, d_image, generator=g),
        prompt_embeddings=torch.randn(classes * templates, d_text, generator=g),
        anchor_text_embeddings=torch.randn(anchors, d_text, generator=g),
        labels=torch.randint(0, classes, (images,), generator=g),
        prompt_class=torch.arange(classes).repeat_interleave(templates),
        num_classes=classes,
    )
