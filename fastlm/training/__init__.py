"""Training helpers: chat templates, data formats, response masking, TRL glue."""
