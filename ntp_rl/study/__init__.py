"""What `ntp-rl compare` builds from finished runs: records (runs linked into lineages), tables, predictors, W&B."""
