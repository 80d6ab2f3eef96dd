"""Built-in embbench plugins, registered through entry points like any third-party package."""
