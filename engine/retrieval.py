"""Image↔text retrieval for images with several captions each, memory-bounded and split over processes.

``retrieval_ranks`` is the one computation: the 0-based rank of every query in both directions. Text → image: a
caption's rank is the number of images scoring higher against it than its own image. Image → text: an image's rank is
the number of captions of *other* images scoring higher than its best caption (every caption of an image counts as
correct). A score counts as higher only by more than ``TIE`` (1e-5): float32 rounding of a dot product of normalized
features is about that large, so closer scores (duplicate captions are common) are ties, and ties count in the
query's favour whichever way the rounding of a particular matrix product fell. ``retrieval_recall`` turns the ranks
into R@k as CLIP papers and LAION's CLIP_benchmark report it (the evaluation suite); ``data.val``'s OpenCLIP metrics
(mean and median rank too) come from the same ranks (``engine/callbacks.py``).

Each process passes only its own rows: its images and their captions (an image's captions on the same process as the
image). The keys of every process are streamed past every process's queries, ``chunk_size`` rows at a time (a
broadcast per chunk): no process ever holds another's features all at once, nor a score matrix larger than
``chunk_size`` x ``chunk_size``. The ranks are those one process holding every row would compute (also at ties: see
``TIE``).

Example:
    >>> import torch
    >>> images = torch.eye(3)                                        # 3 images
    >>> texts = torch.tensor([[1.0, 0, 0], [0, 0.6, 0.8], [0, 0.8, 0.6], [0, 0, 1]])
    >>> recall = retrieval_recall(images, texts, torch.tensor([0, 1, 1, 2]), ks=(1,))
    >>> recall["image_to_text_R@1"], recall["text_to_image_R@1"]    # caption 1 is nearer image 2
    (1.0, 0.75)
    >>> retrieval_ranks(images, texts, torch.tensor([0, 1, 1, 2]))[1].tolist()
    [0, 1, 0, 0]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cadenza.engine import dist

#: scores closer than this to a query's correct score count as ties (in the query's favour)
TIE = 1e-5


def retrieval_ranks(
    images: torch.Tensor, texts: torch.Tensor, text_image: torch.Tensor, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank of each of this process's images and captions among the rows of every process.

    Args:
        images: ``(I, D)`` normalized features of this process's images.
        texts: ``(T, D)`` normalized features of this process's captions.
        text_image: ``(T,)`` the row in ``images`` of each caption's image.
        chunk_size: rows compared at a time (and sent per broadcast).

    Returns:
        ``(I,)`` and ``(T,)`` 0-based ranks: of each image's best caption among all captions, and of each caption's
        image among all images (a query is found at ``k`` when its rank is below ``k``).
    """
    device = images.device
    text_image = text_image.to(device=device, dtype=torch.long)
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = _all_sizes(len(images), len(texts), device)  # (world, 2): images, captions of each process
    image_offset = int(sizes[:rank, 0].sum())
    own_image = text_image + image_offset  # (T,) global image index of each caption

    # The best correct score of each query: its image (a caption), its best caption (an image).
    text_target = (texts * images[text_image]).sum(dim=1)  # (T,)
    image_target = torch.full((len(images),), float("-inf"), device=device)
    image_target = image_target.scatter_reduce(0, text_image, text_target, reduce="amax")  # (I,)
    image_ids = torch.arange(len(images), device=device) + image_offset  # (I,)

    text_above = torch.zeros(len(texts), dtype=torch.long, device=device)  # images above each caption's own
    image_above = torch.zeros(len(images), dtype=torch.long, device=device)  # captions above each image's best
    for source in range(world):
        source_images, source_texts = (int(n) for n in sizes[source])
        start_image = int(sizes[:source, 0].sum())
        for start in range(0, source_images, chunk_size):
            length = min(chunk_size, source_images - start)
            keys = _send(images[start : start + length] if source == rank else None, source, length, images)
            key_ids = torch.arange(start_image + start, start_image + start + length, device=device)
            _count_above(texts, text_target, own_image, keys, key_ids, text_above, chunk_size, consecutive_keys=True)
        for start in range(0, source_texts, chunk_size):
            length = min(chunk_size, source_texts - start)
            mine = slice(start, start + length)
            keys = _send(texts[mine] if source == rank else None, source, length, texts)
            key_owner = _send(own_image[mine] if source == rank else None, source, length, own_image)
            _count_above(
                images, image_target, image_ids, keys, key_owner, image_above, chunk_size, consecutive_keys=False
            )
    return image_above, text_above


def retrieval_recall(
    images: torch.Tensor,
    texts: torch.Tensor,
    text_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """R@k image → text and text → image over the rows of every process (arguments as ``retrieval_ranks``'s).

    Returns:
        ``image_to_text_R@k`` and ``text_to_image_R@k`` for each ``k``, fractions of all processes' images and
        captions.
    """
    image_above, text_above = retrieval_ranks(images, texts, text_image, chunk_size)
    hits = torch.tensor(
        [[int((image_above < k).sum()), int((text_above < k).sum())] for k in ks] + [[len(images), len(texts)]],
        dtype=torch.float64,
        device=images.device,
    )  # (len(ks) + 1, 2): image and caption hits per k, then the counts of images and captions
    if dist.get_world_size() > 1:
        torch.distributed.all_reduce(hits)
    hits = hits.cpu()
    total_images, total_texts = (max(float(n), 1.0) for n in hits[-1])
    metrics = {}
    for row, k in enumerate(ks):
        metrics[f"image_to_text_R@{k}"] = float(hits[row, 0]) / total_images
        metrics[f"text_to_image_R@{k}"] = float(hits[row, 1]) / total_texts
    return metrics


def _all_sizes(num_images: int, num_texts: int, device: torch.device) -> torch.Tensor:
    """``(world, 2)``: every process's numbers of images and captions."""
    mine = torch.tensor([[num_images, num_texts]], dtype=torch.long, device=device)
    if dist.get_world_size() == 1:
        return mine.cpu()
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    torch.distributed.all_gather(parts, mine)
    return torch.cat(parts).cpu()


def _send(rows: torch.Tensor | None, source: int, length: int, like: torch.Tensor) -> torch.Tensor:
    """``length`` rows of process ``source`` (``rows`` there, ``None`` elsewhere), on every process; ``like`` gives
    the shape of a row, the dtype and the device."""
    if dist.get_world_size() == 1:
        return rows
    if rows is None:
        rows = torch.empty((length, *like.shape[1:]), dtype=like.dtype, device=like.device)
    rows = rows.contiguous()
    torch.distributed.broadcast(rows, source)
    return rows


def _count_above(
    queries: torch.Tensor,
    targets: torch.Tensor,
    query_ids: torch.Tensor,
    keys: torch.Tensor,
    key_ids: torch.Tensor,
    above: torch.Tensor,
    chunk_size: int,
    consecutive_keys: bool,
) -> None:
    """Add to ``above`` the keys scoring above each query's target (by more than ``TIE``), except the query's own
    (equal ids). ``consecutive_keys``: the key ids count up by one (image keys); else the query ids do (images
    asking for captions), so a query's own keys are found by subtracting ids, not by comparing every pair."""
    for start in range(0, len(queries), chunk_size):
        chunk = slice(start, start + chunk_size)
        scores = queries[chunk] @ keys.T  # (C, K)
        threshold = targets[chunk] + TIE  # (C,)
        counts = (scores > threshold[:, None]).sum(dim=1)  # (C,)
        # the query's own keys are in that count when they scored above the threshold: take them out again
        ids = query_ids[chunk]
        if consecutive_keys:  # a caption's own image: one column
            column = ids - key_ids[0] if len(key_ids) else ids[:0]
            rows = torch.nonzero((column >= 0) & (column < len(keys))).squeeze(1)
            columns = column[rows]
        else:  # an image's own captions: each key's owner is one row
            row = key_ids - ids[0] if len(ids) else key_ids[:0]
            columns = torch.nonzero((row >= 0) & (row < len(ids))).squeeze(1)
            rows = row[columns]
        own = (scores[rows, columns] > threshold[rows]).long()
        above[chunk] += counts - torch.zeros_like(counts).index_add_(0, rows, own)
