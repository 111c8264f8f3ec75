"""``python -m studies.reproduce``: see :mod:`studies.reproduce.run`."""

from studies.reproduce.run import main

if __name__ == "__main__":
    main()
