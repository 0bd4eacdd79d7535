from components.synthetic.cli import data

data(prog_name="python -m components.synthetic")
