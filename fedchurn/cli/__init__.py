"""One module per `fedchurn` command: each has register(commands) and run(args) -> exit code."""
