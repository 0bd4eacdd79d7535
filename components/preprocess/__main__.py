from components.cli import run_alone
from components.preprocess.cli import preprocess_cmd

run_alone(preprocess_cmd, "python -m components.preprocess")
