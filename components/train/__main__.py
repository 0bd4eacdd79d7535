from components.cli import run_alone
from components.train.cli import train_cmd

run_alone(train_cmd, "python -m components.train")
