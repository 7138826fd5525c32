"""FD-digits: the Frechet distance between images and the digits set in the feature space of a small classifier.

It plays FID's role for the embedded default. The classifier (`DigitsFeatureNet`) is trained on the same 8x8 digits
(`python -m sid_fast.metrics.digits --out sid_fast/assets/digits_features.pt`) and checked in; features are its
64-d penultimate activations; the reference statistics are those of all 1797 digits. Statistics and distance are
computed exactly as for FID (sid_fast.metrics).
"""

from __future__ import annotations

import functools
from pathlib import Path

import click
import torch
import torch.nn.functional as F

from sid_fast.data.digits import digits_tensor
from sid_fast.metrics import feature_stats, frechet_distance

ASSET = Path(__file__).resolve().parent.parent / "assets" / "digits_features.pt"


class DigitsFeatureNet(torch.nn.Module):
    def __init__(self, feature_dim=64):
        super().__init__()
        self.conv0 = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.conv1 = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.fc = torch.nn.Linear(32 * 2 * 2, feature_dim)
        self.head = torch.nn.Linear(feature_dim, 10)

    def features(self, x):
        """x: [N, 1, 8, 8] in [-1, 1] -> [N, 64]."""
        x = F.avg_pool2d(F.silu(self.conv0(x)), 2)
        x = F.avg_pool2d(F.silu(self.conv1(x)), 2)
        return self.fc(x.flatten(1))

    def forward(self, x):
        return self.head(F.silu(self.features(x)))


def train_feature_net(steps=3000, seed=0) -> tuple[DigitsFeatureNet, float]:
    """Train on all digits with small random shifts and noise; returns (net, training accuracy)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = digits_tensor()
    net = DigitsFeatureNet()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(steps):
        idx = torch.randint(len(x), [128], generator=g)
        xb = x[idx]
        shift = torch.randint(-1, 2, [2], generator=g).tolist()
        xb = torch.roll(xb, shifts=shift, dims=(2, 3)) + 0.05 * torch.randn(xb.shape, generator=g)
        loss = F.cross_entropy(net(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = (net(x).argmax(1) == y).float().mean().item()
    return net.eval(), acc


@functools.lru_cache(maxsize=1)
def load_feature_net(path: str | None = None) -> DigitsFeatureNet:
    path = Path(path) if path else ASSET
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: the digits feature network is missing; rebuild it with `python -m sid_fast.metrics.digits`."
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = DigitsFeatureNet()
    net.load_state_dict(state["state_dict"])
    return net.eval().requires_grad_(False)


@torch.no_grad()
def digits_features(images: torch.Tensor, batch=512) -> torch.Tensor:
    net = load_feature_net()
    images = images.float().cpu().clamp(-1, 1)
    return torch.cat([net.features(images[i : i + batch]) for i in range(0, len(images), batch)])


@functools.lru_cache(maxsize=1)
def reference_stats():
    return feature_stats(digits_features(digits_tensor()[0]))


def fd_digits(images: torch.Tensor) -> float:
    """FD-digits of images [N, 1, 8, 8] in [-1, 1] against all 1797 digits (N >= 2; use >= 1000 for stability)."""
    mu, sigma = feature_stats(digits_features(images))
    mu_r, sigma_r = reference_stats()
    return frechet_distance(mu, sigma, mu_r, sigma_r)


@click.command(context_settings=dict(help_option_names=["-h", "--help"]))
@click.option(
    "--out", default=None, metavar="FILE.pt", help="[default: the bundled sid_fast/assets/digits_features.pt]"
)
@click.option("--steps", type=click.IntRange(min=1), default=3000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def main(out, steps, seed):
    """Train the FD-digits feature network."""
    out = out or str(ASSET)
    net, acc = train_feature_net(steps, seed)
    cmd = f"python -m sid_fast.metrics.digits --out {out} --steps {steps} --seed {seed}"
    torch.save(dict(state_dict=net.state_dict(), train_accuracy=acc, command=cmd), out)
    print(f"saved {out}: training accuracy {acc:.4f}")


if __name__ == "__main__":
    main()
