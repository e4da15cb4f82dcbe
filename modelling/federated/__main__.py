"""``python -m modelling.federated``."""

from modelling.federated.cli import main

if __name__ == "__main__":
    main()
