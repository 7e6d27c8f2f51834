"""Everything a client does, behind the privacy boundary, independent of the transport.

A client folder (the client's own disk) holds:

  client.json         its configuration: model, privacy, budget, score release policy, training
  data/               its private preference pairs (a Hugging Face dataset)
  ledger.jsonl        its privacy ledger; ledger_key.pem / ledger_key.pub sign and verify it
  rm/                 its trained reward model (never leaves this folder)

and, apart from it, the client's provisioning kit (``mor-secure provision``): TLS CA, node-auth
key and the CKKS secret context used to encrypt scores and, as decryptor, open aggregates.

Budgets are enforced here, from this folder's own configuration -- never from anything the
server says. Every release is authorised by the client's ``BudgetGuard`` (write-ahead ledger
entry) before it is computed and sent; a refusal raises ``BudgetExceededError``.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mor_secure.config import ClientSection
from mor_secure.crypto import ckks
from mor_secure.alignment.perception import build_base_model
from mor_secure.data import get_family, load_split
from mor_secure.errors import ConfigError
from mor_secure.federation.protocol import DecryptRequest, ScoreRequest
from mor_secure.privacy.budget import Budget, BudgetGuard
from mor_secure.privacy.events import GaussianScoreRelease
from mor_secure.privacy.ledger import Ledger, load_signing_key
from mor_secure.rewards.reward_model import LORA_TARGETS, VISION_LORA_TARGETS, RewardModel
from mor_secure.rewards.train import TrainSettings, train_reward_model

log = logging.getLogger(__name__)
CLIENT_FILE = "client.json"


@dataclass(frozen=True)
class ClientSetup:
    """The contents of ``client.json``: the client's own section plus the benchmark's shared facts."""

    config: ClientSection
    seed: int
    image_size: int

    def to_json(self) -> str:
        return json.dumps({"config": self.config.model_dump(mode="json"), "seed": self.seed,
                           "image_size": self.image_size}, indent=2)

    @classmethod
    def read(cls, folder: Path) -> "ClientSetup":
        path = folder / CLIENT_FILE
        if not path.is_file():
            raise ConfigError(f"client folder {folder} has no {CLIENT_FILE}; prepare it with `mor-secure run` "
                              "(simulation) or `mor-secure client init` (deployment)")
        raw = json.loads(path.read_text())
        return cls(ClientSection.model_validate(raw["config"]), int(raw["seed"]), int(raw["image_size"]))


class ClientNode:
    """One client: trains its RM in phase 1 and releases protected scores afterwards."""

    def __init__(self, folder: Path, kit_dir: Path | None = None) -> None:
        self.folder = Path(folder)
        self.kit_dir = Path(kit_dir) if kit_dir is not None else None
        self._ckks = None
        self.setup = ClientSetup.read(self.folder)
        self.config = self.setup.config
        self.ledger = Ledger(self.folder / "ledger.jsonl", signing_key=load_signing_key(self.folder / "ledger_key.pem"))
        self.budget = Budget(epsilon=self.config.budget.epsilon, delta=self.config.budget.delta,
                             phase_caps=self.config.budget.phase_caps or {})
        self.guard = BudgetGuard(self.ledger, self.budget)
        self._rm: RewardModel | None = None
        # Secure-RNG note: noise comes from numpy's PCG64 seeded from OS entropy (not a CSPRNG);
        # see threat_model.md.
        self._noise = np.random.default_rng()
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def rm_dir(self) -> Path:
        return self.folder / "rm"

    @property
    def ckks_context(self):
        """The kit's secret CKKS context (loaded once, kit checked: permissions, manifest)."""
        if self._ckks is None:
            if self.kit_dir is None:
                raise ConfigError(f"client {self.name} has no provisioning kit, so it cannot use CKKS: start its "
                                  "SuperNode with --node-config 'kit-dir=\"PATH\"' (see README 'Across machines')")
            from mor_secure.crypto.provision import load_client_kit

            kit = load_client_kit(self.kit_dir)
            if kit.name != self.name:
                raise ConfigError(f"kit {self.kit_dir} belongs to client {kit.name!r}, not {self.name!r}; "
                                  "pass this client's own kit as kit-dir")
            self._ckks = kit.ckks_context
        return self._ckks

    # -- releases ------------------------------------------------------------------------------
    def _record(self, event, context: dict) -> None:
        """Write-ahead: authorise against the budget and append, or (risk flag) append only."""
        if self.config.privacy.allow_non_private:
            self.ledger.append(event, context)
        else:
            self.guard.authorize(event, context)

    # -- phase 1 ---------------------------------------------------------------------------------
    def build_backbone(self, progress: bool = False):
        """A local checkpoint, or a random model (perception pre-trained on *public* images only,
        when the config asks: no record of this client is used, so it costs no privacy)."""
        vlm, _ = build_base_model(self.config.model, track=get_family(self.config.families[0]).track,
                                  image_size=self.setup.image_size, data_seed=self.setup.seed,
                                  model_seed=self.setup.seed + 1000 + sum(map(ord, self.name)), progress=progress)
        return vlm

    def train(self, run_id: str, *, progress: bool = True) -> str:
        """Train the RM (once; a finished RM on disk is reused on resume). Returns its model class."""
        marker = self.rm_dir / "complete"
        if marker.is_file():
            return marker.read_text().strip()
        pairs = list(load_split(self.folder / "data"))
        t = self.config.training
        p = self.config.privacy
        settings = TrainSettings(epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, optimizer=t.optimizer, dp=p.dp_sgd,
                                 target_epsilon=p.epsilon, delta=p.delta, max_grad_norm=p.max_grad_norm,
                                 seed=self.setup.seed)
        vlm = self.build_backbone(progress)
        rm = RewardModel(vlm, lora_r=t.lora_r, seed=self.setup.seed,
                         lora_targets=VISION_LORA_TARGETS if t.lora_vision else LORA_TARGETS)
        context = {"run_id": run_id, "phase": "rm_training", "purpose": "DP-SGD training of the reward model",
                   "client": self.name}
        train_reward_model(rm, pairs, settings, authorize=lambda ev: self._record(ev, context),
                           progress=progress, desc=f"{self.name} RM")
        rm.save(self.rm_dir)
        model_class = type(vlm.model).__name__
        marker.write_text(model_class)
        self._rm = rm
        return model_class

    @property
    def reward_model(self) -> RewardModel:
        if self._rm is None:
            if not (self.rm_dir / "complete").is_file():
                raise ConfigError(f"client {self.name} has no trained reward model yet; phase 1 must run first")
            self._rm = RewardModel.load(self.rm_dir)
        return self._rm

    @property
    def model_class(self) -> str:
        return (self.rm_dir / "complete").read_text().strip()

    # -- phases 2-3 ------------------------------------------------------------------------------
    def score(self, req: ScoreRequest) -> np.ndarray:
        """Clipped, noised scores for ``req``, recorded in the ledger before they exist."""
        bound, sigma = self.config.scores.clip_bound, self.config.scores.noise_std
        event = GaussianScoreRelease(noise_std=sigma, clip_bound=bound, count=len(req.responses))
        context = {"run_id": req.run_id, "phase": req.phase, "purpose": req.purpose, "client": self.name}
        with self._lock:
            rm = self.reward_model  # not trained yet: ConfigError before anything is recorded
            self._record(event, context)  # raises BudgetExceededError: nothing computed, nothing sent
            with torch.no_grad():
                raw = rm.score(req.pil_images(), req.questions_per_response(), req.responses)
            clipped = np.clip(raw.numpy().astype(np.float64), -bound, bound)
            return clipped + self._noise.normal(0.0, sigma, size=clipped.shape) if sigma > 0 else clipped

    def encrypt(self, scores: np.ndarray) -> bytes:
        """One packed CKKS ciphertext of already clipped, noised scores (adds no DP, only secrecy)."""
        return ckks.encrypt_scores(self.ckks_context, scores)

    def decrypt(self, req: DecryptRequest) -> np.ndarray:
        """Decryptor role: open the aggregate the server formed. Releases nothing of this client's
        own data beyond its already-ledgered encrypted scores, so it is not a ledger event."""
        log.info("client %s decrypts an aggregate of %d slots (run %s, %s)", self.name, req.length, req.run_id,
                 req.phase)
        return ckks.decrypt_aggregate(self.ckks_context, req.ciphertext, req.length)
