"""Built-in dataset readers, each registered in the ``embbench.datasets`` entry-point group."""
