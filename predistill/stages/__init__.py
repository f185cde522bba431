"""The commands: one module per `predistill` subcommand; they import the layers below and never each other (recipe and demo drive the others through the CLI)."""
