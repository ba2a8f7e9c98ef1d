"""``python -m surgeon``: the command line, as the ``surgeon`` script runs it.

This is what ``torchrun`` starts on every process::

    torchrun --nproc-per-node 4 -m surgeon apply RECIPE ...
"""
from surgeon.cli import main

if __name__ == "__main__":
    main()
