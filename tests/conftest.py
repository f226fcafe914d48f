"""Session-wide test environment, set before any test module imports metaflow or jax.

Metaflow reads its configuration once at import, so the private datastore and user name must be in the environment before the first import anywhere in the session.
"""

import os
import tempfile

_MF_ROOT = tempfile.mkdtemp(prefix="flaxchat-mf-")
os.environ.setdefault("METAFLOW_DATASTORE_SYSROOT_LOCAL", _MF_ROOT)
os.environ.setdefault("METAFLOW_USER", "tester")
os.environ.setdefault("METAFLOW_DEFAULT_METADATA", "local")
os.environ.setdefault("METAFLOW_DEFAULT_DATASTORE", "local")
os.environ.setdefault("WANDB_MODE", "disabled")
