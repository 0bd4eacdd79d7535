from components.cli import run_alone
from components.synthetic.cli import data

run_alone(data, "python -m components.synthetic")
