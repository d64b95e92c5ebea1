"""The ground floor: pipeline stages as plain functions with typed options and results, and the variant
kinds. No Prefect, no MLflow, and nothing from `flows` is imported here."""
