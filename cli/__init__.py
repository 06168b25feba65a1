"""The command line: the one module that imports every layer."""
