"""`python -m dpo_cli` runs the same CLI as the `dpo-cli` console script."""

from dpo_cli.cli import main

main()
