"""The composition root: the server that wires everything, the command line, convert."""
