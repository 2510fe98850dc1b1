"""The `charging` command: the app's commands (charging/app/cli.py) and the tools'
(charging/tools/commands.py) on one command line. The roof of the package: it imports the
floors below it and nothing imports it (docs/layout.md)."""

from charging.app import cli
from charging.tools import commands

commands.register(cli.app)
app = cli.app
main = cli.main
