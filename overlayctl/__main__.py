from overlayctl.cli import entry

entry()
