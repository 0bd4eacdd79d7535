from components.train.cli import train_cmd

train_cmd(prog_name="python -m components.train")
