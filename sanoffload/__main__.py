"""``python3 -m sanoffload``: the same as the ``sanoffload`` console script."""

from .cli import main

if __name__ == "__main__":
    main()
