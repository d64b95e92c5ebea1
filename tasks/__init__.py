"""Pipeline stages as plain functions with typed inputs and results; no Prefect, no MLflow here."""
