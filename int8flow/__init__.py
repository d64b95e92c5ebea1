"""int8flow: an FP32 model in, the best INT8 / int4 / fp16 ONNX variant for this CPU out, proven.

The import package is `int8flow`; its two floors are the repository's top-level folders, linked in
here: `int8flow.tasks` (`tasks/`, the stages and the variant kinds: plain functions and typed options,
no Prefect or MLflow) and `int8flow.flows` (`flows/`, the Prefect flow, the CLI, the spec file and the
MLflow adapter). One namespace keeps the generic names `flows` and `tasks` out of site-packages.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("int8flow")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
