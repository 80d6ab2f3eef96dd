"""Suite files shipped with embbench (``embbench list suites``); the TOML files are package data."""
