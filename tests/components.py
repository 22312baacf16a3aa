"""Components the tests name in recipes (`_target_: components.X`); tests put this folder on PYTHONPATH."""

from __future__ import annotations

import os
import random
import signal

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset


class IndexDataset(Dataset):
    """Item i is (tensor([i]), 0): lets a probe model see which samples a rank trained on."""

    def __init__(self, n: int = 64) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.tensor([float(i)]), 0


class AugmentedClassification(Dataset):
    """SyntheticClassification with random augmentation drawn from python's, numpy's and torch's generators in
    __getitem__ (in loader workers): exact resume needs every draw of an interrupted run to come back."""

    def __init__(self, num_samples: int = 256, num_features: int = 32) -> None:
        from launcher.zoo.datasets import SyntheticClassification
        self.base = SyntheticClassification(num_samples=num_samples, num_features=num_features)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.base[i]
        scale = 1.0 + 0.1 * random.random() + 0.1 * float(np.random.rand())
        return x * scale + 0.05 * torch.randn(x.shape), y


class DrawsDataset(Dataset):
    """Item i is [i, a python, a numpy and a torch random draw] (what random augmentation would use)."""

    def __init__(self, n: int = 24) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.tensor([float(i), random.random(), float(np.random.rand()), float(torch.rand(()))],
                            dtype=torch.float64)


def tagging_collate(batch):
    """A collate_fn that marks its batches, so a test sees the recipe's collate_fn was used."""
    return torch.stack(batch), torch.full((len(batch),), 7)


class IndexProbe(nn.Module):
    """Records the sample indices of every batch it sees to OUT/indices-rank<r>.txt, one line per batch."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out
        self.lin = nn.Linear(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with open(os.path.join(self.out, f"indices-rank{os.environ.get('RANK', '0')}.txt"), "a") as f:
            f.write(",".join(str(int(v)) for v in x[:, 0].tolist()) + "\n")
        return self.lin(x / 100.0)


class SeedProbeDataset(Dataset):
    """Writes (rank, worker, the worker's seed, numpy draw, python draw) for each item it serves to OUT/seeds.txt."""

    def __init__(self, out: str, n: int = 32) -> None:
        self.out = out
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        info = torch.utils.data.get_worker_info()
        row = (os.environ.get("RANK"), info.id if info else -1, info.seed if info else torch.initial_seed(),
               int(np.random.randint(2**31)),
               random.randrange(2**31))
        with open(os.path.join(self.out, "seeds.txt"), "a") as f:
            f.write(" ".join(map(str, row)) + "\n")
        return torch.zeros(4), 0


class FailingMLP(nn.Module):
    """An MLP that fails on rank `rank` at forward call `step`: raises, or kills its own process."""

    def __init__(self, step: int = 3, rank: int = 1, mode: str = "raise") -> None:
        super().__init__()
        self.lin = nn.Linear(32, 4)
        self.calls = 0
        self.step, self.rank, self.mode = step, rank, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.step and int(os.environ.get("RANK", "0")) == self.rank:
            if self.mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected failure at step {self.step}")
        return self.lin(x)


class KillableMLP(nn.Module):
    """An MLP with dropout that SIGKILLs its own rank once, at forward call KILL_AT_STEP on rank KILL_RANK, when
    those variables are set and KILL_MARKER does not exist yet (it creates it); that sleeps for an hour at forward
    call HANG_AT_STEP on rank HANG_RANK; that sends itself SIGUSR2 (a stop request) at forward call USR2_AT_STEP on
    rank USR2_RANK. Otherwise a plain MLP."""

    def __init__(self, in_features: int = 32, hidden: int = 16, out_features: int = 4, dropout: float = 0.1,
                 step_sleep: float = 0.0) -> None:
        super().__init__()
        self.step_sleep = step_sleep
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, out_features))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        at, marker = os.environ.get("KILL_AT_STEP"), os.environ.get("KILL_MARKER")
        if at and marker and self.calls == int(at) and os.environ.get("RANK") == os.environ.get("KILL_RANK", "1") \
                and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        if os.environ.get("USR2_AT_STEP") == str(self.calls) and os.environ.get("RANK") == os.environ.get("USR2_RANK"):
            os.kill(os.getpid(), signal.SIGUSR2)
        if os.environ.get("HANG_AT_STEP") == str(self.calls) and os.environ.get("RANK") == os.environ.get("HANG_RANK"):
            import time
            time.sleep(3600)  # a hung rank: its peers wait for it in the next collective
        if self.step_sleep:
            import time
            time.sleep(self.step_sleep)  # stands in for real work, so a test can act mid-training
        return self.net(x)


class EnvIndexProbe(IndexProbe):
    """IndexProbe writing to $PROBE_OUT (so runs of one recipe can record to different places)."""

    def __init__(self) -> None:
        super().__init__(out="")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.out = os.environ["PROBE_OUT"]
        return super().forward(x)


class OOMMLP(nn.Module):
    """An MLP that raises the out-of-memory error CUDA raises, at forward call `step` on rank `rank`."""

    def __init__(self, step: int = 3, rank: int = 1) -> None:
        super().__init__()
        self.lin = nn.Linear(32, 4)
        self.calls, self.step, self.rank = 0, step, rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.step and int(os.environ.get("RANK", "0")) == self.rank:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 1; 79.15 GiB total)")
        return self.lin(x)


class AllocatingMLP(nn.Module):
    """An MLP that asks the device for `gib` GiB at forward call `step`: a real out-of-memory on a GPU."""

    def __init__(self, step: int = 3, gib: int = 1 << 20) -> None:
        super().__init__()
        self.lin = nn.Linear(32, 4)
        self.calls, self.step, self.gib = 0, step, gib

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.step:
            x = x + torch.empty(self.gib << 30, dtype=torch.uint8, device=x.device).sum()
        return self.lin(x)


class LayoutProbeCNN(nn.Module):
    """A small CNN for 1x8x8 images that writes, on its first forward in each process, whether its input and its
    convolution weight are in channels_last memory format, to OUT/layout-rank<r>.txt."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 10)
        self.seen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.seen:
            self.seen = True
            cl = torch.channels_last
            with open(os.path.join(self.out, f"layout-rank{os.environ.get('RANK', '0')}.txt"), "w") as f:
                f.write(f"input {x.is_contiguous(memory_format=cl)} weight "
                        f"{self.conv.weight.is_contiguous(memory_format=cl)}\n")
        return self.head(torch.relu(self.conv(x)).flatten(1))


class TokenDataset(Dataset):
    """SyntheticClassification that takes a credential, as a dataset reading from a private store does: it fails
    unless `token` is the value of $EXPECTED_TOKEN, so a run passes only when each rank resolved the reference."""

    def __init__(self, token: str, url: str = "", **kwargs) -> None:
        from launcher.zoo.datasets import SyntheticClassification
        if token != os.environ.get("EXPECTED_TOKEN"):
            raise ValueError(f"TokenDataset got token {token!r}, not the value of $EXPECTED_TOKEN")
        self.inner = SyntheticClassification(**kwargs)

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        return self.inner[i]


class UnusedHeadMLP(nn.Module):
    """An MLP with a second head that forward never uses (a classic: a head left over from another task)."""

    def __init__(self, in_features: int = 32, out_features: int = 4) -> None:
        super().__init__()
        self.body = nn.Linear(in_features, out_features)
        self.aux_head = nn.Linear(in_features, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class BiasOnly(nn.Module):
    """Logits that ignore the input (a learnable bias): the loss on one batch cannot fall far below its start."""

    def __init__(self, out_features: int = 4) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x.shape[0], -1)


class NaNAfter(nn.Module):
    """A linear model whose output turns NaN at forward call `step` on rank `rank`."""

    def __init__(self, in_features: int = 32, out_features: int = 4, step: int = 3, rank: int = 1) -> None:
        super().__init__()
        self.lin = nn.Linear(in_features, out_features)
        self.calls, self.step, self.rank = 0, step, rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.lin(x)
        if self.calls >= self.step and int(os.environ.get("RANK", "0")) == self.rank:
            out = out * float("nan")
        return out


class FlawedDataset(Dataset):
    """SyntheticClassification with planted flaws for the doctor's data check: item `raise_at` raises ValueError,
    item `odd_at` has `odd_features` features instead of num_features, and every item first sleeps `sleep_s` (a
    slow disk or network: the loader waits, the CPU does not work)."""

    def __init__(self, num_samples: int = 256, num_features: int = 32, raise_at: int | None = None,
                 odd_at: int | None = None, odd_features: int = 31, sleep_s: float = 0.0) -> None:
        from launcher.zoo.datasets import SyntheticClassification
        self.base = SyntheticClassification(num_samples=num_samples, num_features=num_features)
        self.raise_at, self.odd_at, self.odd_features, self.sleep_s = raise_at, odd_at, odd_features, sleep_s

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        if self.sleep_s:
            import time
            time.sleep(self.sleep_s)
        if i == self.raise_at:
            raise ValueError(f"corrupt record {i}: checksum mismatch")
        x, y = self.base[i]
        return (x[: self.odd_features] if i == self.odd_at else x), y


class KeepsOutputMLP(nn.Module):
    """An MLP whose forward keeps every output, with its graph, in a list (what `history.append(loss)` does in a
    training loop): its memory grows every step by the outputs it keeps (batch x out_features floats)."""

    def __init__(self, in_features: int = 32, hidden: int = 16, out_features: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features))
        self.history: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        self.history.append(out)
        return out


class WideActivations(nn.Module):
    """Megabytes of activations per sample for a megabyte of parameters: each sample's features repeated `expand`
    times and scaled (4 x expand x in_features bytes a copy), so that a memory budget can fall between two batch
    sizes. On rank `ballast_rank` it also holds `ballast_mb` MB that the other ranks do not: less room there only."""

    def __init__(self, in_features: int = 32, out_features: int = 4, expand: int = 8192, ballast_mb: int = 0,
                 ballast_rank: int = 1) -> None:
        super().__init__()
        self.expand = expand
        self.scale = nn.Parameter(torch.ones(in_features * expand))
        self.head = nn.Linear(in_features, out_features)
        mine = int(os.environ.get("RANK", "0")) == ballast_rank
        self.ballast = torch.ones(ballast_mb << 18) if ballast_mb and mine else None  # not a buffer: rank 1's own

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(x.repeat(1, self.expand) * self.scale)
        return self.head(h.view(x.shape[0], self.expand, -1).mean(1))


class HistoryLoss(nn.Module):
    """Cross-entropy that keeps every loss, with its graph, in a list (`history.append(loss)` in a loss function)."""

    def __init__(self) -> None:
        super().__init__()
        self.history: list[torch.Tensor] = []

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.cross_entropy(output, target)
        self.history.append(loss)
        return loss


class RunningLoss(nn.Module):
    """Cross-entropy that sums its losses for a running mean, without detaching (`total += loss`): the sum's graph
    keeps every step's graph alive, though no step's loss tensor is kept."""

    def __init__(self) -> None:
        super().__init__()
        self.total: torch.Tensor | float = 0.0
        self.count = 0

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.cross_entropy(output, target)
        self.total += loss
        self.count += 1
        return loss


class LastOutputMLP(KeepsOutputMLP):
    """An MLP that keeps only its latest output (a module that shows its last activations): no growth, no leak."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        self.history = [out]
        return out
