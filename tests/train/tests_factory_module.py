"""A user's own model and data factories, importable as ``tests_factory_module:NAME`` (tests add this folder to
sys.path)."""

import torch


def make_linear() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))


def make_mlp(hidden: int = 16, norm: str = "layer") -> torch.nn.Module:
    """A 64 -> hidden -> 10 MLP for 8x8 digits with a LayerNorm (``norm="layer"``) or none (``"none"``)."""
    layers = [torch.nn.Flatten(), torch.nn.Linear(64, hidden)]
    if norm == "layer":
        layers.append(torch.nn.LayerNorm(hidden))
    return torch.nn.Sequential(*layers, torch.nn.Tanh(), torch.nn.Linear(hidden, 10))


def make_dropout_mlp(hidden: int = 32, p: float = 0.3) -> torch.nn.Module:
    """An MLP with dropout: training draws from the global torch RNG, so a resume must restore it exactly."""
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, hidden), torch.nn.ReLU(),
                               torch.nn.Dropout(p), torch.nn.Linear(hidden, 10))


def small_digits(train: int = 400, test: int = 200, augment: str = "none"):
    """The bundled digits, cut to the first ``train`` / ``test`` samples: a dataset as a user builds their own."""
    from sharpscope.data import ImageDataset, channel_stats, load_dataset

    full = load_dataset("digits")
    images = full.train_images[:train]
    mean, std = channel_stats(images)
    return ImageDataset(name="small-digits", train_images=images, train_labels=full.train_labels[:train],
                        test_images=full.test_images[:test], test_labels=full.test_labels[:test],
                        num_classes=10, mean=mean, std=std, augment=augment)


def not_a_dataset():
    return {"images": torch.zeros(3, 1, 8, 8)}
