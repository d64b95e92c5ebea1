"""The upper floor: the Prefect flow, the CLI, the spec file and the MLflow adapter (imports `tasks`)."""
