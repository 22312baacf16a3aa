"""`python -m launcher RECIPE.yaml ...`: the same as the `launch` command."""

from .cli import main

main()
