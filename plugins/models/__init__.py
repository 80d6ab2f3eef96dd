"""Built-in recommendation models, each registered in the ``embbench.models`` entry-point group."""
