from carctl.cli import entry

entry()
