"""Phase 2: the Mixture-of-Rewards router and per-client score calibration.

``R(x, y) = sum_k w_k(x) * (a_k * s_k(x, y) + b_k)`` with ``w(x) = softmax(g_phi(features(x)))``
over the clients present. ``features(x)`` are pooled hidden states of the frozen reference
VLM on the prompt (image + question). ``a_k > 0`` (softplus) rescales each client's scores.

The router is fitted by maximising the Bradley-Terry likelihood of the server's objective
labels: ``P(a > b | x) = sigmoid(R(x, a) - R(x, b))``. Because both responses of a pair share
``w(x)``, ``b_k`` cancels in that difference: it is not identifiable from pairwise labels, so it
is kept at 0 (a constant shift of a reward changes neither GRPO's group-normalised advantages
nor the objective).

The fit also learns a per-input confidence ``c(x) > 0`` and maximises the likelihood of
``sigmoid(c(x) * (R(x, a) - R(x, b)))``. Without it the router can only express "these scores
are unreliable here" by moving weight onto an uninformative client (seen in practice: weight
drifting to a client whose scores are noise). ``c(x)`` is per prompt, so it cancels in GRPO's
group-normalised advantages; GRPO receives ``R`` itself.

The fit adds ``entropy_weight * mean_x H(w(x))`` to that loss. Pairwise likelihood alone leaves
the weights under-determined: once the owner's scores rank a family's pairs correctly, moving
weight onto another client whose scores barely vary there costs almost nothing, so the fit
stops at a split. Measured on the demo's own objective set and ε = 8 reward models: with no
penalty the position owner got 0.34-0.50 of the weight (the count client up to 0.56, though
its objective-set accuracy on position is 0.41, below chance); at 0.05 every family's owner got
>= 0.96 over three noise draws, with the same objective accuracy (0.79-0.81). This is the usual
sparse-gating penalty of mixtures of experts. On inputs that no client owns the likelihood
itself already picks one client: on the benchmark's ``shapes-heldout`` track (size owned by no
client, ε = 8) the router gave hospital_a 1.00 and 0.82 of size's weight on seeds 0 and 1 at 0.05,
and 1.00 and 0.82 at ``entropy_weight: 0`` (benchmarks/alignment_heldout_entropy0.md), so the
penalty is not what concentrates the weight there.

Missing clients (refused, dropped, rejected) are masked: their logits are set to -inf, so the
softmax renormalises over the clients present.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm


def masked_weights(logits: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Softmax over clients present. logits (N, K); present (N, K) or (K,) bool -> (N, K).

    A row with no client present gets all-zero weights (no reward information).
    """
    present = present.expand_as(logits)
    masked = logits.masked_fill(~present, float("-inf"))
    weights = torch.softmax(masked, dim=-1)
    return torch.nan_to_num(weights, nan=0.0)


def mixture_reward(weights: torch.Tensor, scores: torch.Tensor, scale: torch.Tensor,
                   present: torch.Tensor) -> torch.Tensor:
    """sum_k w_k * a_k * s_k over present clients. weights/scores/present (N, K); scale (K,) -> (N,)."""
    calibrated = torch.where(present, scores * scale, torch.zeros_like(scores))
    return (weights * calibrated).sum(-1)


def mean_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of the rows of ``weights`` (N, K); zero weights contribute 0."""
    return -(weights * torch.log(weights.clamp_min(1e-12))).sum(-1).mean()


def pairwise_objective(reward_a: torch.Tensor, reward_b: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Mean Bradley-Terry negative log-likelihood; label 1.0 means ``a`` is preferred."""
    return nn.functional.binary_cross_entropy_with_logits(reward_a - reward_b, label)


class Router(nn.Module):
    """g_phi: features (N, H) -> client logits (N, K); plus softplus calibration scales a_k.

    Features are first projected on their top ``components`` principal directions (fitted on
    the objective set by ``fit_projection``): the objective set is small (hundreds of pairs)
    and a router over the full hidden size overfits it -- measured: weight drifting to a
    client whose scores are noise.
    """

    def __init__(self, feature_dim: int, clients: list[str], hidden: int = 0, components: int = 8) -> None:
        super().__init__()
        self.clients = list(clients)
        self.feature_dim = feature_dim
        self.hidden = hidden
        self.components = components = min(components, feature_dim)
        k = len(self.clients)
        self.register_buffer("center", torch.zeros(feature_dim))
        self.register_buffer("basis", torch.eye(feature_dim)[:, :components])
        self.norm = nn.LayerNorm(components, elementwise_affine=False)
        self.g = (nn.Linear(components, k) if hidden == 0
                  else nn.Sequential(nn.Linear(components, hidden), nn.Tanh(), nn.Linear(hidden, k)))
        self.raw_scale = nn.Parameter(torch.zeros(k))
        self.confidence_head = nn.Linear(components, 1)  # c(x), used by the fit only

    @torch.no_grad()
    def fit_projection(self, features: torch.Tensor) -> None:
        self.center.copy_(features.mean(0))
        q = min(self.components, features.shape[0], features.shape[1])
        _, _, v = torch.pca_lowrank(features - self.center, q=q, center=False)
        self.basis.zero_()
        self.basis[:, :q].copy_(v[:, :q])

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.norm((features - self.center) @ self.basis)

    @property
    def scale(self) -> torch.Tensor:
        return nn.functional.softplus(self.raw_scale) / nn.functional.softplus(torch.zeros(()))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.g(self.project(features))

    def confidence(self, features: torch.Tensor) -> torch.Tensor:
        return nn.functional.softplus(self.confidence_head(self.project(features))).squeeze(-1) + 1e-3

    def weights(self, features: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        return masked_weights(self.logits(features), present)

    def reward(self, features: torch.Tensor, scores: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        return mixture_reward(self.weights(features, present), scores, self.scale, present)

    def save(self, path: Path) -> None:
        torch.save({"state": self.state_dict(), "clients": self.clients, "feature_dim": self.feature_dim,
                    "hidden": self.hidden, "components": self.components}, path)

    @classmethod
    def load(cls, path: Path) -> "Router":
        blob = torch.load(path, weights_only=True)
        router = cls(blob["feature_dim"], blob["clients"], blob["hidden"], blob["components"])
        router.load_state_dict(blob["state"])
        return router


@dataclass
class RouterFit:
    losses: list[float] = field(default_factory=list)
    accuracy: float = float("nan")  # objective-set pairwise accuracy of the fitted mixture


def fit_router(router: Router, features: torch.Tensor, scores_a: torch.Tensor, scores_b: torch.Tensor,
               labels: torch.Tensor, present: torch.Tensor, *, steps: int, lr: float,
               weight_decay: float = 0.0, entropy_weight: float = 0.0, progress: bool = True,
               seed: int = 0) -> RouterFit:
    """Full-batch Adam on the pairwise objective plus ``entropy_weight`` times the weights' mean
    entropy (see the module docstring). features (N, H); scores_* and present (N, K)."""
    torch.manual_seed(seed)
    router.fit_projection(features)
    opt = torch.optim.Adam(router.parameters(), lr=lr, weight_decay=weight_decay)
    fit = RouterFit()
    router.train()
    for _ in tqdm(range(steps), desc="router fit", disable=not progress, leave=False):
        weights = router.weights(features, present)
        ra = mixture_reward(weights, scores_a, router.scale, present)
        rb = mixture_reward(weights, scores_b, router.scale, present)
        conf = router.confidence(features)
        loss = pairwise_objective(conf * ra, conf * rb, labels) + entropy_weight * mean_entropy(weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
        fit.losses.append(loss.item())
    router.eval()
    with torch.no_grad():
        ra, rb = router.reward(features, scores_a, present), router.reward(features, scores_b, present)
        fit.accuracy = float(((ra > rb).float() == labels).float().mean())
    return fit
