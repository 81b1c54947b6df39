"""lmforge: shared pieces (errors, typed config loading, the `lmforge` command)."""
