"""GaMPEN science library: simulations, network, training, MC-dropout posteriors.

Plain Python; never imports Dagster. Every stage is a function callable from a notebook.
"""

__version__ = "0.1.0"
