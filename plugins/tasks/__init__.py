"""Built-in tasks: what is learned from a dataset and how it is scored."""
