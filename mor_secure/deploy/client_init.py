"""``mor-secure client init``: prepare one client's own folder for a SuperNode, without the server.

The folder is what ``ClientNode`` reads (see ``mor_secure.federation.client_node``):
``client.json`` (this client's section of the config + the benchmark's shared facts), ``data/``
(its private preference pairs), its ledger key pair, and ``superexec_auth.secret`` (32 random
bytes, 0600: the secret its SuperNode and scoring service share when the service is the
SuperNode's ClientApp executor, ``--superexec-auth-secret-file``). With ``kit`` the ledger key pair is
the one the provisioner issued (the server kit holds its public half, so the server can verify
the ledger); without a kit a fresh pair is generated.

Benchmark data is a pure function of the config: the pairs are exactly those the simulation
would give this client (same seed, same client index). A real deployment replaces ``data/``
with the client's own records in the same format (``mor_secure.data.storage``).
"""

from __future__ import annotations

import secrets
from pathlib import Path

from mor_secure.config import RunConfig
from mor_secure.crypto.kitfs import make_dir, write_file
from mor_secure.crypto.provision import load_client_kit
from mor_secure.data.benchmark import make_client_pairs
from mor_secure.data.storage import save_records
from mor_secure.errors import ConfigError
from mor_secure.federation.client_node import CLIENT_FILE, ClientSetup
from mor_secure.federation.scoring_service import EXECUTOR_SECRET
from mor_secure.privacy.ledger import generate_signing_key


def init_client_folder(cfg: RunConfig, name: str, out: Path, kit: Path | None = None) -> Path:
    """Create ``out`` as client ``name``'s folder; ConfigError if it already holds a client.

    Guarantees: nothing outside ``out`` is written; key files are owner-only (0600); the kit,
    when given, must be this client's (its manifest names ``name``) and passes its checks.
    """
    out = Path(out).resolve()
    section = cfg.client(name)  # ConfigError naming the known clients
    if (out / CLIENT_FILE).exists():
        raise ConfigError(f"{out} already holds a client folder ({CLIENT_FILE}); choose another --out")
    client_kit = load_client_kit(kit) if kit is not None else None
    if client_kit is not None and client_kit.name != name:
        raise ConfigError(f"kit {kit} belongs to client {client_kit.name!r}, not {name!r}; pass --kit for {name}")
    make_dir(out)
    d = cfg.data
    index = [c.name for c in cfg.clients].index(name)
    pairs = make_client_pairs(d.track, list(section.families), d.pairs_per_client, cfg.run.seed, d.image_size,
                              d.foreign_fraction, d.foreign_label_noise, client_index=index,
                              n_clients=len(cfg.clients), malformed_fraction=d.malformed_fraction)
    save_records(pairs, "pairs", out / "data")
    if client_kit is None:
        generate_signing_key(out / "ledger_key.pem", out / "ledger_key.pub")
    else:
        write_file(out / "ledger_key.pem", client_kit.ledger_key_path.read_bytes())
        write_file(out / "ledger_key.pub", client_kit.ledger_pub_path.read_bytes())
    write_file(out / EXECUTOR_SECRET, secrets.token_bytes(32))
    (out / CLIENT_FILE).write_text(ClientSetup(section, cfg.run.seed, d.image_size).to_json())
    return out
