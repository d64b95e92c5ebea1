"""int8flow: the Prefect flow, the spec models, the CLI and the MLflow adapter."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("int8flow")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
