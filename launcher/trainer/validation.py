"""Loss (and accuracy, for classifiers) over the whole validation set, exact over uneven shards: each rank sums
over its disjoint share, the sums are added over ranks, then divided by the true number of samples."""

from __future__ import annotations

from typing import Any, Callable, ContextManager, Iterable

import torch
import torch.distributed as tdist


def evaluate(model: torch.nn.Module, loader: Iterable[Any], loss_fn: Callable[[Any, Any], torch.Tensor],
             inputs_targets: Callable[[Any], tuple[Any, Any]], autocast: Callable[[], ContextManager[Any]],
             device: torch.device) -> tuple[dict[str, float], int]:
    """The validation metrics (val/loss, and val/accuracy when every rank's outputs are logits [N, C] for integer
    targets [N]) and the number of samples they cover. Collective when a process group of several ranks exists."""
    was_training = model.training
    model.eval()
    # loss x samples, correct predictions, samples, ranks that cannot count accuracy
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    with torch.no_grad():
        for batch in loader:
            inputs, targets = inputs_targets(batch)
            with autocast():
                out = model(inputs)
                loss = loss_fn(out, targets)
            n = targets.shape[0] if isinstance(targets, torch.Tensor) and targets.ndim > 0 else 1
            sums[0] += loss.double() * n
            sums[2] += n
            if (isinstance(out, torch.Tensor) and out.ndim == 2 and isinstance(targets, torch.Tensor)
                    and targets.ndim == 1 and not targets.is_floating_point()):
                sums[1] += (out.argmax(dim=1) == targets).sum().double()
            else:
                sums[3] = 1
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(sums)
    model.train(was_training)
    total = max(float(sums[2]), 1.0)
    metrics = {"val/loss": float(sums[0]) / total}
    if float(sums[3]) == 0:
        metrics["val/accuracy"] = float(sums[1]) / total
    return metrics, int(sums[2])
