"""ray_codistill: codistillation of neural networks on Ray Train, compared with all-reduce DDP.

Importing the package has no side effects; the modules are listed in docs/layout.md ("Layout").
"""

__version__ = "0.1.0"
