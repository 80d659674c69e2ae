from modelfold.cli import run

run()
