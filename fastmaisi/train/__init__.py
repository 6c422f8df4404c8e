"""Training: one loop (`loop.train`) shared by the five MAISI recipes (`trainers`), their data (`data`), loss terms
(`losses`), latent pre-computation (`encode`) and the `fastmaisi train` / `fastmaisi encode` commands (`cli`).

Nothing is imported here, so `fastmaisi train --help` answers before torch loads.
"""
