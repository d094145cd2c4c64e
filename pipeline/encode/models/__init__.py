"""Model families: source.py describes a checkpoint, load.py loads it, one module per family does the rest."""
