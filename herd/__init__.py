"""herd's command line and process management (`herd generate`, `herd score`, `herd up`, ...)."""
