"""Configuration: the schema (schema.py, a leaf module), Hydra composition (compose.py) and the
checks beyond types (validate.py). Import the module you need; this package re-exports nothing."""
