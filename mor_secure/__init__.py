"""mor_secure: privacy-hardened federated alignment of heterogeneous VLMs by Mixture-of-Rewards."""

__version__ = "0.1.0"
