"""Simulated galaxies (paper §2): Table-1 parameters, PSF library, noise pool, GalSim
rendering and the shard writer. See ``docs/architecture.md`` ("Simulation")."""

from gampen_ml.sim.errors import InputFileError

__all__ = ["InputFileError"]
