"""Configuration: the schema (schema.py, a leaf module; pipeline_schema.py, the pipeline's, on top
of it), Hydra composition (compose.py) and the checks beyond types (validate.py). Import the
module you need; this package re-exports nothing."""
