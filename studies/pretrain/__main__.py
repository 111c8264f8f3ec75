"""``python -m studies.pretrain``: see :mod:`studies.pretrain.recipe`."""

from studies.pretrain.recipe import main

if __name__ == "__main__":
    main()
