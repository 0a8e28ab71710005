"""dataclay_hpc: persistent active objects on the MPI ranks of an HPC job.

Code written for dataClay runs after changing ``dataclay`` to ``dataclay_hpc``::

    from dataclay_hpc import Client, DataClayObject, activemethod
"""

from .client import Client
from .context import ContextThreadPoolExecutor, use_dataset
from .execution import Constraints, constraints, current_constraints
from .metadata import BackendInfo, ObjectMetadata
from .object import DataClayObject, StorageObject, activemethod

__all__ = [
    "BackendInfo",
    "Client",
    "Constraints",
    "ContextThreadPoolExecutor",
    "DataClayObject",
    "ObjectMetadata",
    "StorageObject",
    "activemethod",
    "constraints",
    "current_constraints",
    "use_dataset",
]

__version__ = "0.1.0"
