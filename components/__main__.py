from components.cli import main

main(prog_name="python -m components")
