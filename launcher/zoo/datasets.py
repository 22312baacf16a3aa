"""Datasets that need no download: synthetic data, scikit-learn's bundled digits, and the Python documentation
text that every CPython installation carries (`pydoc_data.topics`), read as bytes for a character-level model."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class SyntheticClassification(Dataset):
    """Gaussian inputs labelled by a fixed random linear teacher: learnable, deterministic in `seed`."""

    def __init__(self, num_samples: int = 4096, num_features: int = 32, num_classes: int = 4, seed: int = 0,
                 noise: float = 0.1) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(num_samples, num_features, generator=g)
        teacher = torch.randn(num_features, num_classes, generator=g)
        logits = self.x @ teacher + noise * torch.randn(num_samples, num_classes, generator=g)
        self.y = logits.argmax(dim=1)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


class Digits(Dataset):
    """scikit-learn's bundled 8x8 handwritten digits (1797 images), split deterministically. `task` 'digit' labels
    them 0-9; 'parity' labels them even (0) or odd (1), a second task for fine-tuning a digit model."""

    def __init__(self, split: str = "train", val_fraction: float = 0.2, seed: int = 0, task: str = "digit") -> None:
        from sklearn.datasets import load_digits

        if split not in ("train", "val"):
            raise ValueError(f"Digits split must be 'train' or 'val', got {split!r}")
        if task not in ("digit", "parity"):
            raise ValueError(f"Digits task must be 'digit' or 'parity', got {task!r}")
        bunch = load_digits()
        images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.tensor(bunch.target, dtype=torch.long)
        if task == "parity":
            labels = labels % 2
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        n_val = int(len(labels) * val_fraction)
        keep = order[:n_val] if split == "val" else order[n_val:]
        self.x, self.y = images[keep], labels[keep]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def python_docs_text() -> str:
    """About 460 kB of English prose: the Python language reference topics shipped with CPython."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


class CharText(Dataset):
    """Next-character prediction over a text as bytes (vocabulary 256): item i is (text[s:s+T], text[s+1:s+T+1])
    with s = i * stride. `path` reads a UTF-8 file; without it, the Python documentation text."""

    def __init__(self, path: str | None = None, seq_len: int = 64, stride: int | None = None,
                 split: str = "train", val_fraction: float = 0.1) -> None:
        text = open(path, encoding="utf-8").read() if path else python_docs_text()
        data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
        cut = int(len(data) * (1 - val_fraction))
        self.data = data[:cut] if split == "train" else data[cut:]
        self.seq_len = seq_len
        self.stride = stride or seq_len
        if len(self.data) <= seq_len:
            raise ValueError(f"text of {len(self.data)} bytes is too short for seq_len {seq_len}")

    def __len__(self) -> int:
        return (len(self.data) - self.seq_len - 1) // self.stride + 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = i * self.stride
        chunk = self.data[s: s + self.seq_len + 1]
        return chunk[:-1], chunk[1:]
