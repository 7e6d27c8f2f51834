"""Running MoR beyond the simulation: client folders, Flower's deployment runtime, benchmarks.

* ``client_init``  prepare a SuperNode's own client folder from a config (no server involved);
* ``local``        start a TLS + node-auth SuperLink and SuperNodes as processes on loopback
                   (tests and a one-machine rehearsal of a multi-host deployment);
* ``inproc``       an in-process Flower ``Grid`` that calls the real ClientApp (benchmarks);
* ``bench``        ``mor-secure bench ckks``: the cost of CKKS aggregation per GRPO step.
"""
