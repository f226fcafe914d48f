"""flaxchat's Metaflow extension: what Metaflow core lacks for running the pipeline on GKE.

Metaflow loads this file because it is `metaflow_extensions/<org>/plugins/mfextinit_<org>.py`
in a directory on sys.path (or an installed distribution). Each `*_DESC` list adds plugins of
one kind; the paths are relative to this package.
"""

# @tpu: a step on a GKE TPU slice (single host, or a multi-host gang through @parallel)
STEP_DECORATORS_DESC = [("tpu", ".tpu_decorator.TpuDecorator")]
