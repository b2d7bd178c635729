"""``python -m webhook.cli``: the ``promotion-gate`` command."""

from webhook.cli import main

main(prog_name="promotion-gate")
