"""`python -m utils.reproduce`: the plan run by utils/reproduce/run.py."""
import sys

from utils.reproduce.run import main

if __name__ == "__main__":
    sys.exit(main())
