"""Built-in embedding schemes, each registered in the ``embbench.schemes`` entry-point group."""
