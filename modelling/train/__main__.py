"""``python -m modelling.train``: see ``modelling.train.cli``."""

from modelling.train.cli import main

if __name__ == "__main__":
    main()
